"""`mirror verify` finds and quarantines a corrupted blob; `mirror gc` removes leftovers and
unreferenced blobs but keeps hosted, pinned and referenced content; an old storage root is
adopted into the ledger."""

import json
import os
import time

from mirror.ops import housekeeping
from mirror.storage.blobs import BlobStore
from mirror.storage.ledger import AGREES_AT, TOTAL
from mirror.storage.sqlite import SqliteMetadata
from tests.conftest import fetched
from tests.test_budget import pull, settle, sha256


async def test_verify_quarantines_a_corrupt_blob_and_the_next_pull_heals(mirror, http,
                                                                        upstream):
    alpine = upstream.images["library/alpine"]
    await pull(http, mirror, "library/alpine", "3.19")
    await settle(mirror)
    victim = max(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    path = mirror.proxy.store.path(victim)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))

    report = await housekeeping.verify(mirror.config)
    assert report.bad == [victim] and report.checked == len(alpine.blobs)
    assert not path.exists()
    assert (mirror.root / "quarantine" / victim.replace(":", "-")).read_bytes() == bytes(data)
    assert await mirror.proxy.index.metadata.manifest(alpine.digest) is None  # forgotten
    upstream.proxy.reset()
    async with http.get(f"{mirror.url}/v2/library/alpine/blobs/{victim}") as resp:
        assert sha256(await resp.read()) == victim
    assert fetched(upstream, "GET", victim) == 1


async def test_gc_removes_leftovers_and_orphans_and_keeps_what_is_used(mirror, http, upstream):
    alpine = upstream.images["library/alpine"]
    await pull(http, mirror, "library/alpine", "3.19")  # referenced by its manifest
    layer = b"hosted layer"
    async with http.post(f"{mirror.url}/v2/gc/hosted/blobs/uploads/?digest={sha256(layer)}",
                         data=layer) as resp:
        assert resp.status == 201
    await settle(mirror)
    store, usage = mirror.proxy.store, mirror.proxy.usage
    # An orphan: a cached blob no manifest refers to, unused for two hours.
    orphan = upstream.push_image("test/gc-orphan", "v", seed="orphan")
    orphan_layer = orphan.layer_digests[0]
    async with http.get(f"{mirror.url}/v2/test/gc-orphan/blobs/{orphan_layer}") as resp:
        await resp.read()
    await settle(mirror)
    await usage.flush()
    await usage._run(usage._db.execute, "UPDATE items SET atime = ? WHERE digest = ?",
                     (time.time() - 7200, orphan_layer))
    # A file the ledger does not know, and a spool no fill touched for two hours.
    stray = store.path("sha256:" + "ab" * 32)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"stray")
    os.utime(stray, (time.time() - 7200, time.time() - 7200))
    spool = store.tmp / "fill-abandoned"
    spool.write_bytes(b"half")
    os.utime(spool, (time.time() - 7200, time.time() - 7200))

    report = await housekeeping.gc(mirror.config)
    assert report.removed == 2
    assert not stray.exists() and store.size(orphan_layer) is None
    assert all(store.size(d) is not None for d in alpine.blobs)
    assert store.size(sha256(layer)) is not None
    # The server holds the root: its spools are fills or resumable downloads, left alone.
    assert report.skipped_spools and spool.exists()
    await mirror.server.close()
    report = await housekeeping.gc(mirror.config)
    assert not report.skipped_spools and report.removed == 1 and not spool.exists()


async def test_the_ledger_is_reconciled_with_the_disk_at_every_start(start_mirror, http,
                                                                     upstream, tmp_path):
    first = await start_mirror(root=tmp_path / "old")
    await pull(http, first, "library/alpine", "3.19")
    await settle(first)
    alpine = upstream.images["library/alpine"]
    await first.server.close()
    # A row lost (as a crash between a commit and its queued ledger write would lose it),
    # and a file lost (deleted by hand) while the ledger still lists it.
    metadata = SqliteMetadata(tmp_path / "old")
    await metadata._run(metadata._db.execute, "DELETE FROM items WHERE digest = ?",
                        (alpine.layer_digests[0],))
    # The crash loses the row's share of the stored total with it (one transaction).
    await metadata._run(metadata._db.execute, "UPDATE meta SET value = value - ? WHERE key = ?",
                        (len(alpine.blobs[alpine.layer_digests[0]]), TOTAL))
    await metadata.close()
    gone = alpine.layer_digests[-1]
    first.proxy.store.path(gone).unlink()

    second = await start_mirror(root=tmp_path / "old")
    usage = second.proxy.usage
    assert (await usage.item(alpine.digest)).kind == "manifest"
    assert set(await usage.children(alpine.digest)) == set(alpine.blobs)
    assert (await usage.item(alpine.layer_digests[0])).size == \
        len(alpine.blobs[alpine.layer_digests[0]])
    assert await usage.item(gone) is None
    assert usage.total() == sum(len(b) for d, b in alpine.blobs.items() if d != gone) \
        + len(alpine.manifest)


async def test_a_start_compares_only_the_blob_directories_changed_since_the_ledger_agreed(
        tmp_path):
    metadata = SqliteMetadata(tmp_path)
    store = BlobStore(tmp_path, metadata)
    try:
        await metadata.agree(time.time() - 100)
        # A ledger row whose file is missing from a directory unchanged since: kept, unread.
        kept = "sha256:aa" + "1" * 62
        metadata.record_blob(kept, 123)
        store.path(kept).parent.mkdir(parents=True)
        long_ago = time.time() - 1000
        os.utime(store.path(kept).parent, (long_ago, long_ago))
        # In a directory changed since: a file the ledger lacks, a row whose file is gone.
        found, gone = "sha256:bb" + "3" * 62, "sha256:bb" + "2" * 62
        store.path(found).parent.mkdir(parents=True)
        store.path(found).write_bytes(b"found on disk")
        metadata.record_blob(gone, 456)
        started = time.time()

        result = await housekeeping.reconcile(store, metadata)
        assert (result.dirs, result.entered, result.forgotten) == (1, 1, 1)
        assert (await metadata.item(kept)).size == 123
        assert (await metadata.item(found)).size == len(b"found on disk")
        assert await metadata.item(gone) is None
        assert metadata.total() == 123 + len(b"found on disk")
        assert await metadata.agrees_at() >= started
    finally:
        await metadata.close()


async def test_a_flush_after_a_commit_moves_the_agreement_time_and_an_idle_one_does_not(
        tmp_path):
    metadata = SqliteMetadata(tmp_path)
    try:
        await metadata.agree(1000.0)
        metadata.touch("sha256:" + "c" * 64)
        await metadata.flush()  # clocks only: no file changed
        assert await metadata.agrees_at() == 1000.0
        before = time.time()
        metadata.record_blob("sha256:" + "d" * 64, 7)
        await metadata.flush()
        assert before <= await metadata.agrees_at() <= time.time()
        assert (await metadata.item("sha256:" + "d" * 64)).size == 7
    finally:
        await metadata.close()


async def test_a_root_from_before_the_agreement_time_is_compared_whole_once(start_mirror, http,
                                                                           upstream, tmp_path):
    first = await start_mirror(root=tmp_path / "old")
    await pull(http, first, "library/alpine", "3.19")
    await settle(first)
    alpine = upstream.images["library/alpine"]
    await first.server.close()
    # An older version's root: no agreement time, a manifest and a blob without rows.
    metadata = SqliteMetadata(tmp_path / "old")
    for digest in (alpine.digest, alpine.layer_digests[0]):
        await metadata._run(metadata._db.execute, "DELETE FROM items WHERE digest = ?",
                            (digest,))
    for key in (AGREES_AT, TOTAL):  # an older version wrote neither
        await metadata._run(metadata._db.execute, "DELETE FROM meta WHERE key = ?", (key,))
    await metadata.close()

    second = await start_mirror(root=tmp_path / "old")
    usage = second.proxy.usage
    assert (await usage.item(alpine.digest)).kind == "manifest"
    assert set(await usage.children(alpine.digest)) == set(alpine.blobs)
    assert (await usage.item(alpine.layer_digests[0])).size == \
        len(alpine.blobs[alpine.layer_digests[0]])
    assert usage.total() == sum(len(b) for b in alpine.blobs.values()) + len(alpine.manifest)
    assert await usage.agrees_at() is not None


async def test_verify_and_gc_commands(mirror, http, upstream, tmp_path):
    from tests.commands import run, write_config
    alpine = upstream.images["library/alpine"]
    await pull(http, mirror, "library/alpine", "3.19")
    await settle(mirror)
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    result = await run(config, "verify")
    assert result.code == 0 and f"verified {len(alpine.blobs)} blobs" in result.out
    victim = alpine.layer_digests[0]
    path = mirror.proxy.store.path(victim)
    path.write_bytes(path.read_bytes() + b"!")
    result = await run(config, "verify")
    assert result.code == 1 and result.out.splitlines()[0] == (
        f"BAD {victim}: moved to {mirror.root}/quarantine/; the next pull fetches it again")
    result = await run(config, "gc")
    assert result.code == 0 and "removed 0 files" in result.out  # all still referenced


async def test_verify_says_a_corrupt_pushed_blob_is_lost_and_names_who_needs_it(
        mirror, http, upstream, tmp_path):
    from tests.commands import run, write_config
    from tests.test_push import error_code, push_blob, push_image
    digest, manifest = await push_image(http, mirror, "team/tool", "1.0", b"pushed")
    async with http.put(f"{mirror.url}/v2/team/tool/manifests/stable", data=manifest,
                        headers={"Content-Type": json.loads(manifest)["mediaType"]}) as resp:
        assert resp.status == 201
    layer = json.loads(manifest)["layers"][0]["digest"]
    path = mirror.proxy.store.path(layer)
    good = path.read_bytes()
    path.write_bytes(good + b"!")
    config = write_config(tmp_path / "mirror.toml", mirror.config)

    result = await run(config, "verify")
    assert result.code == 1
    assert result.out.splitlines()[0] == (
        f"BAD {layer}: moved to {mirror.root}/quarantine/; it was pushed here and no upstream "
        "has it, so it is lost: team/tool:1.0, team/tool:stable cannot be pulled until pushed "
        "again (only the missing blob is uploaded)")
    assert "next pull" not in result.out
    # Nothing goes upstream for it; the manifest, whose bytes are sound, is kept.
    async with http.get(f"{mirror.url}/v2/team/tool/blobs/{layer}") as resp:
        assert resp.status == 404 and await error_code(resp) == "BLOB_UNKNOWN"
    async with http.get(f"{mirror.url}/v2/team/tool/manifests/1.0") as resp:
        assert resp.status == 200 and await resp.read() == manifest
    assert upstream.proxy.requests == []
    # Pushing the blob again mends the image.
    assert await push_blob(http, mirror, "team/tool", good) == layer
    async with http.get(f"{mirror.url}/v2/team/tool/blobs/{layer}") as resp:
        assert await resp.read() == good


async def test_verify_of_a_blob_both_cached_and_pushed_says_the_next_pull_mends_both(
        mirror, http, upstream, tmp_path):
    from tests.commands import run, write_config
    from tests.test_push import image_manifest, push_blob
    alpine = upstream.images["library/alpine"]
    await pull(http, mirror, "library/alpine", "3.19")
    await settle(mirror)
    victim = max(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    config_blob = b'{"shared": true}'
    await push_blob(http, mirror, "team/copy", config_blob)
    async with http.post(f"{mirror.url}/v2/team/copy/blobs/uploads/?mount={victim}"
                         "&from=library/alpine") as resp:
        assert resp.status == 201, await resp.text()
    manifest = image_manifest(config_blob, [alpine.blobs[victim]])
    async with http.put(f"{mirror.url}/v2/team/copy/manifests/v1", data=manifest,
                        headers={"Content-Type": json.loads(manifest)["mediaType"]}) as resp:
        assert resp.status == 201, await resp.text()
    path = mirror.proxy.store.path(victim)
    path.write_bytes(path.read_bytes()[:-1])
    result = await run(write_config(tmp_path / "mirror.toml", mirror.config), "verify")
    assert result.code == 1
    assert result.out.splitlines()[0] == (
        f"BAD {victim}: moved to {mirror.root}/quarantine/; the next pull of a cached image "
        "that has it fetches it again, which also mends the hosted team/copy:v1")
