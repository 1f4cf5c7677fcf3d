"""The disk budget: LRU eviction under a tiny storage.max_size while clients pull, with
pinned and hosted content kept, shared layers kept while an image uses them, and an
eviction pass whose work follows what it evicts, not the size of the cache."""

import asyncio
import hashlib
import json

from mirror.keys import BUDGET, UPLOADS
from mirror.storage.sqlite import SqliteMetadata
from tests.conftest import fetched
from tests.support import images

MiB = 1 << 20
ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                    "application/vnd.oci.image.manifest.v1+json"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def pull(http, mirror, name, tag="latest"):
    """Manifest by tag, then every blob; each body is checked against its digest."""
    async with http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT) as resp:
        assert resp.status == 200, await resp.text()
        manifest = await resp.read()
        assert sha256(manifest) == resp.headers["Docker-Content-Digest"]
    document = json.loads(manifest)
    for descriptor in [document["config"], *document["layers"]]:
        async with http.get(f"{mirror.url}/v2/{name}/blobs/{descriptor['digest']}") as resp:
            assert resp.status == 200
            assert sha256(await resp.read()) == descriptor["digest"]  # never served broken
    return sha256(manifest), document


def budget(max_size):
    return {"max_size": max_size, "high_watermark": 0.9, "low_watermark": 0.6,
            "keep_recent": 0.0}


async def settle(mirror):
    """Fills ended, and the responses' holds released: a client can have read the last
    byte before the server's response coroutine resumes to release its hold."""
    for digest in list(mirror.proxy.fills.active):
        while digest in mirror.proxy.fills.active:
            await asyncio.sleep(0.01)
    readers = mirror.server.app[BUDGET].readers
    for _ in range(500):
        if not readers:
            break
        await asyncio.sleep(0.01)


async def consistent(mirror):
    """No tag record points to a missing manifest; no manifest to a missing blob."""
    metadata, store = mirror.proxy.index.metadata, mirror.proxy.store
    for repository, tag, _, record in await metadata.tag_records():
        assert await metadata.manifest(record.digest) is not None, (repository, tag)
    for item in await metadata.items():
        if item.kind == "manifest":
            for child in await metadata.children(item.digest):
                assert store.size(child) is not None or \
                    await metadata.manifest(child) is not None


async def test_tiny_budget_while_clients_pull_keeps_pinned_and_hosted(start_mirror, http,
                                                                      upstream, tmp_path):
    mirror = await start_mirror(root=tmp_path / "budget", storage=budget(10 * MiB))
    evictor = mirror.server.app[BUDGET]

    # Hosted content (1 MiB) and a pinned cached image (alpine, ~3 MiB).
    layer = bytes(range(256)) * 4096
    async with http.post(f"{mirror.url}/v2/hosted/app/blobs/uploads/?digest={sha256(layer)}",
                         data=layer) as resp:
        assert resp.status == 201
    alpine, _ = await pull(http, mirror, "library/alpine", "3.19")
    await settle(mirror)
    assert await mirror.proxy.usage.pin(alpine)

    # Clients pull other images while eviction passes run in between.
    others = [upstream.push_image(f"test/budget{i}", "latest", seed=f"budget{i}", size=MiB)
              for i in range(6)]
    for image in others:
        await asyncio.gather(pull(http, mirror, image.name), pull(http, mirror, image.name))
        await settle(mirror)
        await evictor.check()
        await consistent(mirror)
    assert evictor.used <= 10 * MiB * 0.9
    assert evictor.evicted_items > 0

    # Pinned and hosted content is all there, with the upstream gone.
    upstream.proxy.down()
    await pull(http, mirror, "library/alpine", "3.19")
    async with http.get(f"{mirror.url}/v2/hosted/app/blobs/{sha256(layer)}") as resp:
        assert await resp.read() == layer
    # The oldest cached image went whole: its tag is a clean 503 now, not a broken pull.
    async with http.get(f"{mirror.url}/v2/{others[0].name}/manifests/latest",
                        headers=ACCEPT) as resp:
        assert resp.status == 503
    # The newest one is still served from the cache.
    await pull(http, mirror, others[-1].name)


async def test_a_shared_layer_stays_while_an_image_uses_it(start_mirror, http, upstream,
                                                          tmp_path):
    base = {"base.bin": images.random_bytes(MiB, "shared-base")}
    old = images.push(upstream.registry, upstream.tokens, images.build_image(
        "test/shared-old", ["latest"], [base, {"own": b"old" * 100_000}]))
    new = images.push(upstream.registry, upstream.tokens, images.build_image(
        "test/shared-new", ["latest"], [base, {"own": b"new" * 100_000}]))
    shared = old.layer_digests[0]
    assert shared == new.layer_digests[0]
    mirror = await start_mirror(root=tmp_path / "shared", storage=budget(10 * MiB))
    await pull(http, mirror, old.name)
    await pull(http, mirror, new.name)
    await settle(mirror)
    # The old image is the least recently used; squeeze the budget so that it must go.
    used = mirror.server.app[BUDGET].used
    await mirror.server.app[BUDGET].evict(used - 1)
    store = mirror.proxy.store
    assert store.size(old.layer_digests[1]) is None
    assert await mirror.proxy.index.manifest(old.digest) is None
    assert store.size(shared) is not None  # the new image still uses it
    await consistent(mirror)
    upstream.proxy.reset()
    await pull(http, mirror, new.name)
    assert fetched(upstream) == 0


async def test_an_eviction_pass_reads_only_what_it_evicts(tmp_path):
    metadata = SqliteMetadata(tmp_path)
    try:
        for i in range(0, 200_000, 20_000):
            def fill(start=i):
                with metadata._tx() as db:
                    db.executemany("INSERT INTO items (digest, kind, size, atime) "
                                   "VALUES (?, ?, ?, ?)", ((f"sha256:{n:064x}", "blob", 1000,
                                                            1000.0 + n)
                                                           for n in range(start, start + 20_000)))
            await metadata._run(fill)
        metadata._total = 200_000 * 1000
        rows = []
        await metadata._run(metadata._db.set_trace_callback, rows.append)
        removed = []
        for item in await metadata.oldest(before=2e9, limit=10):
            evicted = await metadata.evict(item.digest, 2e9, lambda d: False, removed.append)
            assert evicted is not None and evicted.item.digest == item.digest
        await metadata._run(metadata._db.set_trace_callback, None)
        assert removed == [f"sha256:{i:064x}" for i in range(10)]
        assert len(rows) < 150  # a page of the index and 10 decisions, not a scan of 200k rows
        assert metadata.total() == 199_990 * 1000
    finally:
        await metadata.close()


async def test_disk_use_budget_and_evictions_show_in_metrics(start_mirror, http, upstream,
                                                              tmp_path):
    mirror = await start_mirror(root=tmp_path / "metrics", storage=budget(10 * MiB))
    await pull(http, mirror, "team/app", "2.0")
    await settle(mirror)
    evictor = mirror.server.app[BUDGET]

    async def scrape():
        async with http.get(f"{mirror.url}/metrics") as resp:
            text = await resp.text()
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line and not line.startswith("#")}
    before = await scrape()
    assert before["mirror_disk_used_bytes"] == evictor.used > 0
    assert before["mirror_disk_budget_bytes"] == 10 * MiB
    await evictor.evict(0)
    after = await scrape()
    assert after["mirror_disk_used_bytes"] == 0
    assert after["mirror_evicted_bytes_total"] - before.get("mirror_evicted_bytes_total", 0) \
        == before["mirror_disk_used_bytes"]


async def test_uploads_and_resumable_downloads_count_and_the_downloads_go_first(
        start_mirror, http, upstream, tmp_path):
    from tests.test_blobs import authorized, blob_url, read_short
    mirror = await start_mirror(root=tmp_path / "extra", storage=budget(3 * MiB))
    evictor = mirror.server.app[BUDGET]
    # An upload in progress: 2 MiB written, not finished.
    async with http.post(f"{mirror.url}/v2/team/big/blobs/uploads/") as resp:
        location = resp.headers["Location"]
    async with http.patch(f"{mirror.url}{location}", data=b"u" * (2 * MiB),
                          headers={"Content-Range": f"0-{2 * MiB - 1}"}) as resp:
        assert resp.status == 202
    await evictor.check()
    assert evictor.used >= 2 * MiB  # the ledger holds nothing yet; the upload counts
    # A download broken off and kept for resuming, pushing the total over the mark.
    alpine = upstream.images["library/alpine"]
    digest = max(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    async with http.get(f"{mirror.url}/v2/library/alpine/manifests/3.19") as resp:
        assert resp.status == 200
    await authorized(mirror, http, digest)
    upstream.proxy.reset()
    upstream.proxy.throttle(4 * MiB, match=digest, method="GET", times=1)
    upstream.proxy.cut(at=MiB + MiB // 2, match=digest, method="GET", times=1)
    received, promised = await read_short(http, blob_url(mirror, digest))
    assert received < promised
    spools = list((mirror.root / "tmp").iterdir())
    assert len(spools) == 1 and spools[0].stat().st_size > 0
    await evictor.check()
    # Over budget: the resumable spool goes first; the upload (a client's work) stays.
    assert not spools[0].exists()
    assert mirror.server.app[UPLOADS].total_bytes() == 2 * MiB
