"""The metadata layer: nothing is ever culled, an old storage root is carried over whole,
eviction decides per item at delete time (mounts and pushes racing it), and `mirror gc`
beside a live server leaves a download kept for resuming alone."""

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import types

import diskcache

from mirror.keys import BUDGET
from mirror.ops import housekeeping
from mirror.storage.metadata import TagRecord
from mirror.storage.sqlite import SqliteMetadata
from tests.conftest import fetched, sha256
from tests.test_blobs import authorized, blob_url, get, read_short
from tests.test_budget import budget, pull, settle

MiB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def push_image(http, mirror, name, tag, layer: bytes) -> tuple[str, bytes]:
    """Push one layer, an empty config and a manifest; (manifest digest, manifest bytes)."""
    config = b"{}"
    for blob in (layer, config):
        async with http.post(f"{mirror.url}/v2/{name}/blobs/uploads/?digest={sha256(blob)}",
                             data=blob) as resp:
            assert resp.status == 201, await resp.text()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": sha256(layer), "size": len(layer)}]}).encode()
    async with http.put(f"{mirror.url}/v2/{name}/manifests/{tag}", data=manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as resp:
        assert resp.status == 201, await resp.text()
    return sha256(manifest), manifest


async def test_a_pushed_image_survives_more_than_a_gibibyte_of_other_metadata(
        start_mirror, http, tmp_path):
    # The diskcache this replaced had a 1 GiB size_limit and culled the oldest keys past
    # it: the pushed manifest (which nothing can fetch again) answered MANIFEST_UNKNOWN.
    mirror = await start_mirror(root=tmp_path / "data", upstreams=())
    digest, manifest = await push_image(http, mirror, "team/app", "v1", b"layer " * 1000)
    metadata = mirror.proxy.index.metadata
    filler = os.urandom(4 * MiB - 64)
    for i in range(280):  # 1.1 GiB of other manifests, as a busy cache accumulates
        body = json.dumps({"n": i}).encode() + filler
        await metadata.put_manifest(sha256(body), OCI_MANIFEST, body, [])
    await mirror.server.close()
    again = await start_mirror(root=tmp_path / "data", upstreams=())
    async with http.get(f"{again.url}/v2/team/app/manifests/v1") as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.read() == manifest
        assert resp.headers["Docker-Content-Digest"] == digest
    await again.server.close()
    shutil.rmtree(tmp_path / "data")  # pytest keeps the last runs' temp dirs: not 1 GiB each


def old_layout(root, alpine, hosted_manifest: bytes, hosted_layer: str):
    """A storage root as the diskcache-based versions wrote it."""
    class OldTagRecord:  # pickled under its old module path, mirror.index
        pass
    shim = types.ModuleType("mirror.index")
    OldTagRecord.__module__, OldTagRecord.__qualname__ = "mirror.index", "TagRecord"
    shim.TagRecord = OldTagRecord
    sys.modules["mirror.index"] = shim
    try:
        record = OldTagRecord()
        record.__dict__.update(digest=alpine.digest, media_type=alpine.media_type,
                               size=len(alpine.manifest), checked_at=time.time())
        with diskcache.Cache(str(root / "index")) as index:
            index.set(f"m:{alpine.digest}", (alpine.media_type, alpine.manifest))
            index.set("t:docker.io/library/alpine:3.19:index", record)
            index.set(f"m:{sha256(hosted_manifest)}", (OCI_MANIFEST, hosted_manifest))
        with diskcache.Cache(str(root / "index" / "catalog")) as catalog:
            catalog.set("library/alpine", time.time())
        with diskcache.Cache(str(root / "hosted")) as hosted:
            hosted.set("repo:team/old", {"tags": {"v1": sha256(hosted_manifest)},
                                         "manifests": {sha256(hosted_manifest): OCI_MANIFEST},
                                         "blobs": {hosted_layer: 10}})
    finally:
        del sys.modules["mirror.index"]


async def test_a_storage_root_of_the_old_layout_is_carried_over_whole(start_mirror, http,
                                                                      upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    root = tmp_path / "old"
    layer = b"0123456789"
    blob = root / "blobs" / "sha256" / sha256(layer)[7:9] / sha256(layer)[7:]
    blob.parent.mkdir(parents=True)
    blob.write_bytes(layer)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {},
                           "layers": [{"digest": sha256(layer), "size": 10}]}).encode()
    old_layout(root, alpine, manifest, sha256(layer))

    mirror = await start_mirror(root=root)
    upstream.proxy.reset()
    async with http.get(f"{mirror.url}/v2/team/old/manifests/v1") as resp:
        assert resp.status == 200 and await resp.read() == manifest
    async with http.get(f"{mirror.url}/v2/team/old/blobs/{sha256(layer)}") as resp:
        assert await resp.read() == layer
    async with http.get(f"{mirror.url}/v2/library/alpine/manifests/3.19") as resp:
        assert resp.status == 200 and await resp.read() == alpine.manifest
    assert fetched(upstream) == 0  # the tag record came along, fresh: no upstream request
    async with http.get(f"{mirror.url}/v2/_catalog") as resp:
        assert set(json.loads(await resp.read())["repositories"]) == {"library/alpine",
                                                                      "team/old"}
    assert not (root / "index").exists() and not (root / "hosted").exists()
    assert len(list((root / "migrated").iterdir())) == 2


async def test_eviction_racing_mounts_and_pushes_never_breaks_a_hosted_image(
        start_mirror, http, upstream, tmp_path):
    mirror = await start_mirror(root=tmp_path / "race", storage=budget(64 * MiB))
    evictor = mirror.server.app[BUDGET]
    alpine = upstream.images["library/alpine"]
    layers = alpine.layer_digests
    for round_ in range(6):
        await pull(http, mirror, "library/alpine", "3.19")
        await settle(mirror)
        await mirror.proxy.index.metadata.flush()
        name = f"team/mounted{round_}"

        async def mount_and_push():
            mounted = []
            for digest in layers:
                async with http.post(f"{mirror.url}/v2/{name}/blobs/uploads/?mount={digest}"
                                     "&from=library/alpine") as resp:
                    if resp.status == 201:
                        mounted.append(digest)
                await asyncio.sleep(0)
            return mounted

        async def push_referring_to_cached_blobs():
            # A manifest whose blobs the store holds (cached) links them without an upload.
            async with http.put(f"{mirror.url}/v2/team/linked{round_}/manifests/v1",
                                data=alpine.manifest,
                                headers={"Content-Type": alpine.media_type}) as resp:
                return resp.status

        # Eviction passes with nothing recent protected, interleaved with the mounts.
        mounted, pushed, *_ = await asyncio.gather(
            mount_and_push(), push_referring_to_cached_blobs(),
            *(evictor.evict(0) for _ in range(3)))
        if pushed == 201:  # acknowledged: the whole image pulls back, byte-exact
            await pull(http, mirror, f"team/linked{round_}", "v1")
        # Every blob whose mount was acknowledged is in the repository, byte-exact.
        for digest in mounted:
            async with http.get(f"{mirror.url}/v2/{name}/blobs/{digest}") as resp:
                assert resp.status == 200, (round_, digest, await resp.text())
                assert sha256(await resp.read()) == digest
    # And a later pass takes none of them.
    await evictor.evict(0)
    for round_ in range(6):
        repo = await mirror.server.app[BUDGET].metadata.hosted(f"team/mounted{round_}")
        for digest in (repo.blobs if repo else {}):
            assert mirror.proxy.store.size(digest) is not None


async def test_gc_beside_a_live_server_keeps_a_download_kept_for_resuming(mirror, http,
                                                                          upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    digest = max(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    data = alpine.blobs[digest]
    async with http.get(f"{mirror.url}/v2/library/alpine/manifests/3.19") as resp:
        assert resp.status == 200  # the name is cached now; its token is in hand
    await authorized(mirror, http, digest)
    upstream.proxy.reset()
    upstream.proxy.cut(at=MiB, match=digest, times=1)
    received, promised = await read_short(http, blob_url(mirror, digest))
    assert received < promised
    spools = list((mirror.root / "tmp").iterdir())
    assert len(spools) == 1
    two_hours_ago = time.time() - 7200
    os.utime(spools[0], (two_hours_ago, two_hours_ago))  # older than gc's spool grace

    report = await housekeeping.gc(mirror.config)
    assert report.skipped_spools and spools[0].exists()
    # The resume still works: the rest is asked with Range, and the bytes are whole.
    status, _, body = await get(http, blob_url(mirror, digest))
    assert (status, body) == (200, data)
    gets = [r for r in upstream.proxy.records if r.method == "GET" and digest in r.path]
    assert [r.status for r in gets] == [200, 206]


async def test_the_metadata_store_answers_while_another_process_holds_its_write_lock(
        tmp_path):
    # A CLI process in a long write transaction must not freeze the server's event loop:
    # metadata calls wait on their own thread, and the loop keeps running meanwhile.
    metadata = SqliteMetadata(tmp_path)
    blocker = SqliteMetadata(tmp_path)
    try:
        await blocker._run(blocker._db.execute, "BEGIN IMMEDIATE")
        write = asyncio.ensure_future(metadata.put_tag(
            "docker.io/x", "t", "index", TagRecord("sha256:" + "0" * 64, OCI_MANIFEST, 2, 0.0)))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not write.done()  # the loop ran; the write is waiting
        await blocker._run(blocker._db.execute, "COMMIT")
        await write
        assert (await metadata.tag("docker.io/x", "t", "index")).size == 2
    finally:
        await metadata.close()
        await blocker.close()


async def test_a_blob_being_read_is_not_evicted_until_its_response_ends(start_mirror, http,
                                                                        upstream, tmp_path):
    image = upstream.push_image("test/held-while-read", "v1", seed="held", size=48 * MiB)
    mirror = await start_mirror(root=tmp_path / "held", storage=budget(1024 * MiB))
    await pull(http, mirror, image.name, "v1")
    await settle(mirror)
    layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
    evictor = mirror.server.app[BUDGET]
    async with http.get(f"{mirror.url}/v2/{image.name}/blobs/{layer}") as resp:
        first = await resp.content.readexactly(MiB)  # then stop reading: the send waits
        await evictor.evict(0)
        assert mirror.proxy.store.size(layer) is not None  # held by the open response
        rest = await resp.read()
    assert sha256(first + rest) == layer
    await asyncio.sleep(0)
    await evictor.evict(0)
    assert mirror.proxy.store.size(layer) is None  # nothing holds it now


async def test_a_manifest_push_on_a_full_disk_is_a_clean_507_and_nothing_is_served(
        start_mirror, http, tmp_path):
    root = tmp_path / "full"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test needs root to mount a tmpfs: {mounted.stderr}"
    try:
        mirror = await start_mirror(root=root, upstreams=())
        layer = b"a layer that fits " * 100
        config = b"{}"
        for blob in (layer, config):
            async with http.post(f"{mirror.url}/v2/team/full/blobs/uploads/?digest="
                                 f"{sha256(blob)}", data=blob) as resp:
                assert resp.status == 201
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": sha256(layer), "size": len(layer)}],
            "annotations": {"padding": "x" * 200_000}}).encode()
        junk = root / "junk"
        with open(junk, "wb") as f:  # fill the disk to the last block
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        async with http.put(f"{mirror.url}/v2/team/full/manifests/v1", data=manifest,
                            headers={"Content-Type": OCI_MANIFEST}) as resp:
            assert resp.status == 507, await resp.text()
            assert resp.headers["Content-Type"] == "application/json"
            error = (await resp.json())["errors"][0]
            assert "full" in error["message"]
        # Nothing half-stored: the tag and the manifest are unknown, also from memory.
        for reference in ("v1", sha256(manifest)):
            async with http.get(f"{mirror.url}/v2/team/full/manifests/{reference}") as resp:
                assert resp.status == 404, reference
        junk.unlink()
        async with http.put(f"{mirror.url}/v2/team/full/manifests/v1", data=manifest,
                            headers={"Content-Type": OCI_MANIFEST}) as resp:
            assert resp.status == 201
        async with http.get(f"{mirror.url}/v2/team/full/manifests/v1") as resp:
            assert await resp.read() == manifest
        await mirror.server.close()
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


async def test_a_deleted_hosted_image_gives_its_blobs_back_after_the_upload_ttl(
        start_mirror, http, tmp_path):
    from mirror import config as cfg
    mirror = await start_mirror(root=tmp_path / "deleted", upstreams=(),
                                hosted=cfg.Hosted(upload_ttl=1.0))
    layer = os.urandom(64 * 1024)
    digest, _ = await push_image(http, mirror, "team/gc", "v1", layer)
    # A blob of a push in progress (no manifest yet) and the image's blobs are kept.
    pending = os.urandom(1000)
    async with http.post(f"{mirror.url}/v2/team/next/blobs/uploads/?digest={sha256(pending)}",
                         data=pending) as resp:
        assert resp.status == 201
    report = await housekeeping.gc(mirror.config, grace=0)
    assert report.removed == 0
    store = mirror.proxy.store
    assert store.size(sha256(layer)) is not None and store.size(sha256(pending)) is not None
    async with http.delete(f"{mirror.url}/v2/team/gc/manifests/{digest}") as resp:
        assert resp.status == 202
    await asyncio.sleep(1.1)  # past hosted.upload_ttl: no push is still on its way
    report = await housekeeping.gc(mirror.config, grace=0)
    assert store.size(sha256(layer)) is None and store.size(sha256(b"{}")) is None
    assert store.size(sha256(pending)) is None  # its push never finished
    assert report.removed == 3
    assert await mirror.proxy.index.metadata.item(digest) is None  # the manifest went too
    async with http.get(f"{mirror.url}/v2/team/gc/blobs/{sha256(layer)}") as resp:
        assert resp.status == 404 and (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_a_reader_joining_while_the_fill_commits_reads_the_committed_file(tmp_path):
    from mirror.cache.fill import Fill
    from mirror.storage.blobs import BlobStore
    metadata = SqliteMetadata(tmp_path)
    try:
        store = BlobStore(tmp_path, metadata)
        data = b"committed bytes"
        fill = Fill(sha256(data), store, lambda start: None)
        os.write(fill._fd, data)
        # The commit's rename, as it happens on a worker thread while the fill is active.
        store.path(sha256(data)).parent.mkdir(parents=True, exist_ok=True)
        os.replace(fill.spool, store.path(sha256(data)))
        fd = fill.open_reader()
        try:
            assert os.pread(fd, 100, 0) == data
        finally:
            os.close(fd)
            os.close(fill._fd)
    finally:
        await metadata.close()


def test_verify_skips_a_blob_evicted_while_it_walks(tmp_path):
    assert housekeeping._hash_file(tmp_path / "gone", "sha256") is None


async def test_a_clock_written_recently_waits_in_memory_and_still_keeps_its_item(tmp_path):
    from mirror.storage.ledger import CLOCK_SECONDS

    metadata = SqliteMetadata(tmp_path)
    digest = "sha256:" + "e" * 64
    try:
        metadata.record_blob(digest, 10, atime=1000.0)
        metadata.touch(digest)
        await metadata.flush()
        written = await metadata._run(metadata._one, "SELECT atime FROM items WHERE digest = ?",
                                      digest)
        assert written[0] > 1000.0
        metadata.touch(digest)  # again, within CLOCK_SECONDS: not written, but seen
        await metadata.flush()
        assert (await metadata._run(metadata._one, "SELECT atime FROM items WHERE digest = ?",
                                    digest)) == written
        held = (await metadata.item(digest)).atime
        assert written[0] < held < written[0] + CLOCK_SECONDS
        # Eviction's check sees the clock in memory: used after the cut-off, the item stays.
        assert await metadata.evict(digest, (written[0] + held) / 2, lambda d: False,
                                    lambda d: None) is None
    finally:
        await metadata.close()
    again = SqliteMetadata(tmp_path)  # closing wrote the clock that waited
    try:
        assert (await again.item(digest)).atime == held
    finally:
        await again.close()
