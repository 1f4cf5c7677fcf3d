"""Crashes: `mirror serve` killed with SIGKILL mid-fill, mid-push, mid-commit and
mid-eviction, then started again on the same storage root.

Each test runs the server as a real process (tests/support/process.py) against the real
upstream stack, kills it by its PID at a moment chosen by watching the disk or the fault
proxy, and restarts it. What must hold afterwards, as an operator sees it:

- every image that was complete before the kill is pullable byte-exact (the digest of the
  manifest and of every blob checked). A pushed image, or a cached one committed well
  before the kill, is answered from the disk alone: the first restart is `server.offline`,
  so nothing can be fetched again. A manifest the cache answers has all its blobs
  whenever it had them at the kill (eviction must never leave one without);
- nothing partial is served: a blob that was filling is absent (and then fetched again,
  whole) or complete; an interrupted upload resumes at an offset whose bytes are exactly
  the client's, or is unknown; a delete that was answered stays done;
- nothing grows without bound under the storage root: tmp/ and uploads/ are emptied or
  reused, and the usage ledger counts every byte of blobs/ (or the budget cannot see it);
  `mirror verify` finds no bad blob.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
import urllib.request
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.support import images as imagelib
from tests.support.images import Image, MiB
from tests.support.process import (
    MirrorProcess,
    PullError,
    absolute,
    blob_files,
    get_blob,
    misnamed_blobs,
    pull,
    push,
    push_blob,
    push_manifest,
    sha256,
    tree,
    wait_until,
    with_digest,
)

pytestmark = pytest.mark.timeout(60)

OFFLINE = {"server": {"offline": True}}


@pytest.fixture
def server(tmp_path, upstream):
    """A `mirror serve` process on tmp_path/data against the upstream; killed at the end."""
    process = MirrorProcess(tmp_path / "data", tmp_path / "mirror", upstream.url)
    try:
        yield process
    finally:
        process.kill()


async def assert_pullable(http: aiohttp.ClientSession, base: str, image: Image,
                          reference: str | None = None) -> None:
    """The image, by tag (or `reference`), byte-exact: the manifest and every blob."""
    pulled = await pull(http, base, image.name, reference or image.tags[0])
    assert pulled.digest == image.digest
    assert pulled.manifest == image.manifest
    assert pulled.blobs == image.blobs  # dicts of bytes: every digest and every byte


def disk_used(base: str) -> float:
    """What the usage ledger counts, as the running server reports it."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(r"^mirror_disk_used_bytes ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, "no mirror_disk_used_bytes in /metrics"
    return float(found.group(1))


def verify_reports_no_bad_blob(server: MirrorProcess) -> str:
    result = server.cli("verify")
    assert result.returncode == 0 and " 0 bad" in result.stdout, (
        f"mirror verify: rc={result.returncode}\n{result.stdout}\n{result.stderr}")
    return result.stdout


# -- (a) mid-fill ------------------------------------------------------------------------


async def test_kill_mid_fill_serves_no_partial_blob_and_fetches_it_again_whole(
        server, upstream, http):
    big = upstream.push_image("crash/fill", "v1", "crash-fill", size=8 * MiB)
    layer = big.layer_digests[0]
    size = len(big.blobs[layer])
    before = [upstream.images["library/alpine"], upstream.images["library/ociimage"],
              upstream.images["library/multiarch"]]
    server.start()
    for image in before:
        await assert_pullable(http, server.url, image)

    # Three kills in a row, each mid-body: leftovers of one must not pile up on the next.
    upstream.proxy.throttle(2 * MiB, match=layer)
    for attempt in range(3):
        reader = asyncio.ensure_future(get_blob(http, server.url, big.name, layer))
        started = len(upstream.proxy.records)

        def mid_body(started: int = started) -> bool:
            return any(layer in r.path and r.method == "GET" and MiB <= r.sent < size - MiB
                       for r in upstream.proxy.records[started:])

        assert await wait_until(mid_body, 15), f"the fill never got going (attempt {attempt})"
        assert layer not in blob_files(server.root), "an unverified blob was committed"
        server.kill()
        with pytest.raises((PullError, aiohttp.ClientError)):
            await reader
        # On disk, with no server: the blob is absent or whole, never a prefix.
        if layer in blob_files(server.root):
            assert sha256(blob_files(server.root)[layer].read_bytes()) == layer
        server.start(**OFFLINE)
        # At most this blob's one spool, if it is kept for resuming; never one per crash.
        assert tree(server.root, "tmp")[1] <= size, f"tmp/ grew across restarts ({attempt})"

        # Offline: only what the cache holds. The blob that was filling is absent (404 or
        # 503 "offline") or whole; the images complete before are answered from disk.
        async with http.get(f"{server.url}/v2/{big.name}/blobs/{layer}") as resp:
            body = await resp.read()
            assert resp.status in (200, 404, 503), (resp.status, body[:200])
            if resp.status == 200:
                assert sha256(body) == layer
        for image in before:
            await assert_pullable(http, server.url, image)
        server.kill()
        server.start()
    upstream.proxy.clear_faults()

    requests_before = len(upstream.proxy.records)
    await assert_pullable(http, server.url, big)
    refetched = [r for r in upstream.proxy.records[requests_before:]
                 if layer in r.path and r.method == "GET"]
    assert refetched, "the interrupted blob was served without fetching it"
    # The commit may follow the last byte sent by a moment: give it that moment.
    await wait_until(lambda: tree(server.root, "tmp") == (0, 0), 10)
    assert tree(server.root, "tmp") == (0, 0), "a spool outlived its fill"
    assert sorted(blob_files(server.root)) == sorted(
        {d for image in [*before, big] for d in image.blobs})
    assert misnamed_blobs(server.root) == []
    server.kill()
    verify_reports_no_bad_blob(server)


# -- (b) mid-push ------------------------------------------------------------------------


async def patch(http, base: str, location: str, data: bytes, start: int) -> str:
    async with http.patch(absolute(base, location), data=data, headers={
            "Content-Range": f"{start}-{start + len(data) - 1}",
            "Content-Type": "application/octet-stream"}) as resp:
        assert resp.status == 202, (resp.status, await resp.read())
        return resp.headers["Location"]


async def resume_or_restart(http, base: str, name: str, upload_id: str, data: bytes,
                            acknowledged: int, sent: int) -> str:
    """After a restart: the upload reports an offset between what the server acknowledged
    and what the client sent, and finishing it from there gives exactly `data`; or it is
    unknown. Returns which."""
    url = f"{base}/v2/{name}/blobs/uploads/{upload_id}"
    async with http.get(url) as resp:
        if resp.status == 404:
            assert json.loads(await resp.read())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
            return "unknown"
        assert resp.status == 204, (resp.status, await resp.read())
        offset = int(resp.headers["Range"].split("-")[1]) + 1
    assert acknowledged <= offset <= sent, (acknowledged, offset, sent)
    location = await patch(http, base, url, data[offset:], offset)
    async with http.put(with_digest(absolute(base, location), sha256(data))) as resp:
        assert resp.status == 201, (resp.status, await resp.read())
    return "resumed"


async def test_kill_mid_push_leaves_uploads_resumable_or_unknown_and_a_fresh_push_works(
        server, http, tmp_path):
    server.start()
    pushed = imagelib.small_image("crash/pushed", ["v1"], "crash-pushed", size=256 * 1024)
    await push(http, server.url, pushed, chunk=100 * 1024)

    name, piece = "crash/upload", 256 * 1024
    between = imagelib.random_bytes(3 * MiB, "crash-between")  # killed between PATCHes
    during = imagelib.random_bytes(3 * MiB, "crash-during")    # killed inside a PATCH body

    async def start_upload() -> tuple[str, str]:
        async with http.post(f"{server.url}/v2/{name}/blobs/uploads/") as resp:
            assert resp.status == 202
            return resp.headers["Location"], resp.headers["Docker-Upload-UUID"]

    location_a, id_a = await start_upload()
    for start in range(0, 3 * piece, piece):
        location_a = await patch(http, server.url, location_a, between[start:start + piece],
                                 start)
    location_b, id_b = await start_upload()
    location_b = await patch(http, server.url, location_b, during[:piece], 0)
    hang = asyncio.Event()

    async def body():
        yield during[piece:piece + 128 * 1024]
        await hang.wait()  # the rest of the chunk never comes: the server dies first

    upload_file = server.root / "uploads" / id_b
    patching = asyncio.ensure_future(http.patch(
        absolute(server.url, location_b), data=body(),
        headers={"Content-Range": f"{piece}-{2 * piece - 1}",
                 "Content-Type": "application/octet-stream"}))
    # The upload's file is where the bytes are; a layout without it still gets the kill.
    await wait_until(lambda: upload_file.exists() and upload_file.stat().st_size > piece, 5)
    server.kill()
    hang.set()
    with pytest.raises(aiohttp.ClientError):
        await patching

    server.start()
    outcomes = [
        await resume_or_restart(http, server.url, name, id_a, between, 3 * piece, 3 * piece),
        await resume_or_restart(http, server.url, name, id_b, during, piece,
                                piece + 128 * 1024),
    ]
    for data in (between, during):
        async with http.get(f"{server.url}/v2/{name}/blobs/{sha256(data)}") as resp:
            if resp.status == 200:  # resumed: the blob is exactly what the client sent
                assert sha256(await resp.read()) == sha256(data)
        # A fresh push of the same bytes works whatever became of the old upload.
        await push_blob(http, server.url, name, data, chunk=piece)
        assert sha256(await get_blob(http, server.url, name, sha256(data))) == sha256(data)

    # An image made of those layers can be pushed and pulled back whole.
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    await push_blob(http, server.url, name, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": imagelib.OCI_MANIFEST,
        "config": {"mediaType": imagelib.OCI_CONFIG, "size": len(config),
                   "digest": sha256(config)},
        "layers": [{"mediaType": imagelib.OCI_LAYER, "size": len(d), "digest": sha256(d)}
                   for d in (between, during)]}).encode()
    await push_manifest(http, server.url, name, "v1", manifest, imagelib.OCI_MANIFEST)
    image = Image(name, ["v1"], sha256(manifest), manifest, imagelib.OCI_MANIFEST,
                  {sha256(d): d for d in (config, between, during)})
    await assert_pullable(http, server.url, image)
    await assert_pullable(http, server.url, pushed)  # pushed before the kill: kept

    assert tree(server.root, "uploads") == (0, 0), (outcomes, os.listdir(
        server.root / "uploads"))
    server.kill()
    verify_reports_no_bad_blob(server)


# -- (c) mid-commit ----------------------------------------------------------------------


async def test_kills_at_random_moments_of_fills_and_pushes_lose_nothing_complete(
        server, upstream, http):
    moments = random.Random(9)  # when each kill lands: the same on every run
    cached = [upstream.push_image(f"crash/many-{i}", "v1", f"crash-many-{i}",
                                  size=[2048, 40 * 1024, 300 * 1024][i % 3])
              for i in range(24)]
    complete: list[tuple[str, Image]] = []  # (kind, image) that a client saw finish
    rounds, pushers, pullers = 3, 2, 3
    seen_uploads = []

    async def pulls(worker: int, round_: int) -> None:
        order = cached[:]
        random.Random(f"{round_}-{worker}").shuffle(order)
        for image in order:
            await assert_pullable(http, server.url, image)
            complete.append(("cached", image))

    async def pushes(worker: int, round_: int) -> None:
        for n in range(1000):
            image = imagelib.small_image(f"crash/pushed-{round_}-{worker}", [f"v{n}"],
                                         f"crash-pushed-{round_}-{worker}-{n}",
                                         size=[512, 20 * 1024, 200 * 1024][n % 3])
            await push(http, server.url, image, chunk=64 * 1024 if n % 2 else None)
            complete.append(("hosted", image))
            if n % 3 == 2:  # and now and then a delete, which must stick as well
                kept = [i for k, i in complete if k == "hosted" and i.name == image.name]
                doomed = kept[-2]
                # Unknown while the DELETE is in flight: a kill may land before its answer.
                complete.remove(("hosted", doomed))
                async with http.delete(f"{server.url}/v2/{doomed.name}/manifests/"
                                       f"{doomed.digest}") as resp:
                    assert resp.status == 202, (resp.status, await resp.read())
                complete.append(("deleted", doomed))

    for round_ in range(rounds):
        server.start()
        workers = [asyncio.ensure_future(pulls(w, round_)) for w in range(pullers)]
        workers += [asyncio.ensure_future(pushes(w, round_)) for w in range(pushers)]
        await asyncio.sleep(moments.uniform(0.3, 2.0))
        failed = [w for w in workers if w.done() and w.exception()]
        assert not failed, f"a client failed before the kill: {failed[0].exception()!r}"
        server.kill()
        await asyncio.gather(*workers, return_exceptions=True)  # they fail now: no server
        seen_uploads.append(tree(server.root, "uploads")[0])

        # Offline: cached images come from the disk or not at all; hosted ones must all be
        # there (a pushed image cannot be fetched again).
        server.start(**OFFLINE)
        assert misnamed_blobs(server.root) == []
        for kind, image in complete:
            if kind == "hosted":
                await assert_pullable(http, server.url, image)
            elif kind == "deleted":
                for reference in (image.digest, image.tags[0]):
                    async with http.get(f"{server.url}/v2/{image.name}/manifests/"
                                        f"{reference}") as resp:
                        assert resp.status == 404, (
                            f"{image.name}:{reference}, deleted before the kill, "
                            f"answers {resp.status}")
            else:
                try:
                    await assert_pullable(http, server.url, image)
                except PullError as e:
                    # Absent from the cache is allowed, manifest or blob: a blob whose last
                    # byte was sent may be killed before its commit, and a pull-through
                    # cache holds a manifest before its blobs. Wrong or short bytes are not.
                    assert e.status in (404, 503), e
        on_disk, in_ledger = tree(server.root, "blobs")[1], disk_used(server.url)
        assert in_ledger >= on_disk, (
            f"the ledger counts {in_ledger:.0f} bytes but blobs/ holds {on_disk}: the "
            "budget cannot see what a crash left committed")
        server.kill()

    # Online again: every complete cached image is pullable (fetched again if need be).
    server.start(hosted={"upload_ttl": 1.0})
    for kind, image in complete:
        if kind != "deleted":
            await assert_pullable(http, server.url, image)
    # Uploads a kill interrupted stay for resuming until upload_ttl; the start with a 1 s
    # TTL removes them all (the killed ones are older than that by now).
    assert tree(server.root, "uploads") == (0, 0), (seen_uploads, sorted(
        os.listdir(server.root / "uploads")))
    await wait_until(lambda: tree(server.root, "tmp") == (0, 0), 10)  # the last commits
    assert tree(server.root, "tmp") == (0, 0), os.listdir(server.root / "tmp")
    server.kill()
    verify_reports_no_bad_blob(server)


# -- (d) mid-eviction --------------------------------------------------------------------


async def test_kill_mid_eviction_leaves_every_answered_manifest_with_all_its_blobs(
        server, upstream, http):
    """Eviction runs while clients pull; then every image is pulled whole once more (so
    each manifest the cache holds has all its blobs) and the server is killed the moment
    the next eviction pass deletes its first blob. Whatever the pass did and did not get
    to, no manifest may be answered without its blobs, from the disk alone."""
    images = [upstream.push_image(f"crash/evict-{i}", "v1", f"crash-evict-{i}",
                                  size=48 * 1024) for i in range(20)]
    budget = {"storage": {"max_size": 300 * 1024, "keep_recent": 0.0}}
    moments = random.Random(9)
    for round_ in range(2):
        server.start(**budget)
        stop = asyncio.Event()

        async def pulls(worker: int, round_: int = round_, stop: asyncio.Event = stop) -> None:
            r = random.Random(f"evict-{round_}-{worker}")
            while not stop.is_set():
                await assert_pullable(http, server.url, r.choice(images))

        workers = [asyncio.ensure_future(pulls(w)) for w in range(3)]
        await asyncio.sleep(moments.uniform(2.0, 6.0))  # eviction passes run meanwhile
        stop.set()
        await asyncio.gather(*workers)  # a pull broken by eviction fails the test here
        for attempt in range(3):
            for image in images:  # 20 x 50 KiB: over the 300 KiB budget again
                await assert_pullable(http, server.url, image)
            # Committed, each one (a commit may follow the last byte sent by a moment).
            await wait_until(lambda: tree(server.root, "tmp") == (0, 0), 10)
            known = list(blob_files(server.root).values())
            # Kill the moment eviction deletes its first blob: the pass is under way.
            if await wait_until(lambda known=known: not all(p.exists() for p in known), 8,
                                0.001):
                break
        else:
            raise AssertionError("no eviction pass deleted anything, over budget 3 times")
        server.kill()

        server.start(**OFFLINE)
        for image in images:
            for reference in ("v1", image.digest):
                try:
                    await assert_pullable(http, server.url, image, reference)
                except PullError as e:
                    # Evicted is fine; a manifest answered without its blobs is not.
                    assert e.what.startswith("manifest") and e.status in (404, 503), e
        assert misnamed_blobs(server.root) == []
        assert disk_used(server.url) >= tree(server.root, "blobs")[1]
        server.kill()
        verify_reports_no_bad_blob(server)
    server.start(**budget)
    for image in images:  # online, everything evicted is fetched again, whole
        await assert_pullable(http, server.url, image)


# -- what a crash can leave, cleaned at the next start -------------------------------------
#
# States a SIGKILL leaves between two steps, made directly because each window is a few
# microseconds wide and a random kill would find it once in thousands of runs.

OLD = 3600.0  # seconds: older than any TTL or grace these tests configure


async def crashed_with(server, upstream, http) -> tuple[Image, Image]:
    """A server that pushed an image and cached alpine, then was killed."""
    alpine = upstream.images["library/alpine"]
    server.start()
    pushed = imagelib.small_image("crash/leftover", ["v1"], "crash-leftover")
    await push(http, server.url, pushed)
    await assert_pullable(http, server.url, alpine)
    server.kill()
    return pushed, alpine


def aged(path: Path) -> Path:
    old = time.time() - OLD
    os.utime(path, (old, old))
    return path


async def test_spool_of_a_killed_fill_is_removed_at_restart(server, upstream, http):
    pushed, alpine = await crashed_with(server, upstream, http)
    spool = server.root / "tmp" / "fill-crashed"
    spool.write_bytes(b"\0" * MiB)  # as fallocate leaves it: full size, mostly zeros
    server.start()
    assert tree(server.root, "tmp") == (0, 0)
    await assert_pullable(http, server.url, pushed)
    await assert_pullable(http, server.url, alpine)


async def test_upload_data_without_its_record_is_removed_after_the_ttl(
        server, upstream, http):
    """Killed between the two files `Uploads.start` writes: data, no record."""
    pushed, _ = await crashed_with(server, upstream, http)
    data_only = server.root / "uploads" / uuid.uuid4().hex
    data_only.write_bytes(b"x" * 1000)
    aged(data_only)
    server.start(hosted={"upload_ttl": 60.0})
    assert tree(server.root, "uploads") == (0, 0), os.listdir(server.root / "uploads")
    await assert_pullable(http, server.url, pushed)


async def test_upload_record_without_its_data_is_removed_after_the_ttl(
        server, upstream, http):
    """Killed between the commit of a finished upload (its data file renamed into
    blobs/) and the removal of its record: a record with no data, forever unless removed."""
    pushed, _ = await crashed_with(server, upstream, http)
    record_only = server.root / "uploads" / f"{uuid.uuid4().hex}.json"
    record_only.write_text(json.dumps({"name": pushed.name, "created": time.time() - OLD}))
    aged(record_only)
    server.start(hosted={"upload_ttl": 60.0})
    assert tree(server.root, "uploads") == (0, 0), os.listdir(server.root / "uploads")
    await assert_pullable(http, server.url, pushed)


async def test_blob_committed_before_its_ledger_entry_is_counted_after_restart(
        server, upstream, http):
    """Killed between the rename into blobs/ and the ledger write: the file is whole and
    correctly named, and the budget must count it, or disk use grows past max_size."""
    pushed, alpine = await crashed_with(server, upstream, http)
    unknown = imagelib.random_bytes(512 * 1024, "crash-unknown")
    blob = server.root / "blobs" / "sha256" / sha256(unknown)[7:9] / sha256(unknown)[7:]
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(unknown)
    server.start()
    on_disk = tree(server.root, "blobs")[1]
    assert disk_used(server.url) >= on_disk, (
        f"the ledger counts {disk_used(server.url):.0f} bytes, blobs/ holds {on_disk}")
    await assert_pullable(http, server.url, pushed)
    await assert_pullable(http, server.url, alpine)
