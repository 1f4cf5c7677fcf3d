"""A full disk on every write path is a clear, clean error: uploads (PATCH, PUT, monolithic
POST) and a blob commit answer 507 with OCI error JSON naming the disk, keep nothing
partial and give the space back; a pull that cannot even spool answers 507 without asking
the upstream; the memory that fills hold while the disk is full is bounded over all fills.

The disks are real: small tmpfs filesystems mounted for the test (root only, as CI runs),
filled up with a filler file, or out of inodes, as a real disk would be.
"""

import asyncio
import json
import os
import subprocess

import aiohttp
import pytest

from mirror.cache import fill as fill_module
from tests.conftest import fetched
from tests.test_blobs import blob_url, committed, get
from tests.test_push import absolute, digest_of

MiB = 1 << 20


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs directory; all are unmounted after the test."""
    mounted = []

    def mount(options: str = "size=2m"):
        root = tmp_path / f"disk{len(mounted)}"
        root.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(root)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"this test needs root to mount a tmpfs: {done.stderr}"
        mounted.append(root)
        return root

    yield mount
    for root in mounted:
        subprocess.run(["umount", "-l", str(root)], check=True)


def fill_up(root, name="filler"):
    """Write a file until the disk is full; return its path (unlink it to free the space)."""
    path = root / name
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(block[:size])
            except OSError:
                continue
    return path


def use_up_inodes(root):
    """Create empty files until no inode is left; return them."""
    made = []
    while True:
        path = root / f"inode-{len(made)}"
        try:
            path.touch()
        except OSError:
            return made
        made.append(path)


def free_bytes(root) -> int:
    stat = os.statvfs(root)
    return stat.f_bavail * stat.f_frsize


def uploads(root):
    return sorted(p.name for p in (root / "uploads").iterdir())


async def oci_error(resp) -> dict:
    assert resp.headers["Content-Type"] == "application/json"
    return json.loads(await resp.read())["errors"][0]


async def start(http, mirror, name):
    async with http.post(f"{mirror.url}/v2/{name}/blobs/uploads/") as resp:
        assert resp.status == 202, await resp.text()
        return absolute(mirror, resp.headers["Location"])


async def assert_disk_full(resp, disk):
    assert resp.status == 507
    error = await oci_error(resp)
    assert error["code"] == "UNKNOWN"
    assert f"mounted at {disk} is full" in error["message"]
    assert str(disk) in error["message"]  # the storage root (here the disk itself)
    return error


async def test_chunk_that_meets_a_full_disk_is_507_and_the_upload_is_removed(
        start_mirror, http, tmpfs):
    disk = tmpfs("size=3m")
    mirror = await start_mirror(root=disk)
    location = await start(http, mirror, "disk/chunked")
    first = os.urandom(MiB)
    async with http.patch(location, data=first,
                          headers={"Content-Range": f"0-{MiB - 1}"}) as resp:
        assert resp.status == 202 and resp.headers["Range"] == f"0-{MiB - 1}"
    free_before = free_bytes(disk)
    async with http.patch(location, data=os.urandom(4 * MiB)) as resp:
        error = await assert_disk_full(resp, disk)
        assert "the upload was removed" in error["message"]
    # Nothing of it stays: neither the chunk that failed nor the one before it.
    assert uploads(disk) == []
    assert free_bytes(disk) >= free_before + MiB
    async with http.get(location) as resp:
        assert resp.status == 404 and (await oci_error(resp))["code"] == "BLOB_UPLOAD_UNKNOWN"
    # With the space back, the client's restart of the push works.
    location = await start(http, mirror, "disk/chunked")
    async with http.put(f"{location}?digest={digest_of(first)}", data=first) as resp:
        assert resp.status == 201
    assert mirror.proxy.store.path(digest_of(first)).read_bytes() == first


async def test_monolithic_push_onto_a_full_disk_is_507_and_leaves_no_upload_record(
        start_mirror, http, tmpfs):
    disk = tmpfs("size=2m")
    mirror = await start_mirror(root=disk)
    data = os.urandom(3 * MiB)
    async with http.post(f"{mirror.url}/v2/disk/mono/blobs/uploads/",
                         params={"digest": digest_of(data)}, data=data) as resp:
        await assert_disk_full(resp, disk)
    assert uploads(disk) == []
    assert mirror.proxy.store.size(digest_of(data)) is None
    assert list((disk / "tmp").iterdir()) == []


async def test_final_put_onto_a_full_disk_is_507_and_removes_the_upload(
        start_mirror, http, tmpfs):
    disk = tmpfs("size=2m")
    mirror = await start_mirror(root=disk)
    location = await start(http, mirror, "disk/put")
    data = os.urandom(3 * MiB)
    async with http.put(f"{location}?digest={digest_of(data)}", data=data) as resp:
        await assert_disk_full(resp, disk)
    assert uploads(disk) == []
    assert mirror.proxy.store.size(digest_of(data)) is None


async def test_upload_that_cannot_even_start_leaves_no_zero_byte_record(
        start_mirror, http, tmpfs):
    disk = tmpfs("size=2m")
    mirror = await start_mirror(root=disk)
    filler = fill_up(disk)
    async with http.post(f"{mirror.url}/v2/disk/start/blobs/uploads/") as resp:
        await assert_disk_full(resp, disk)
    assert uploads(disk) == []
    filler.unlink()
    await start(http, mirror, "disk/start")
    assert len(uploads(disk)) == 2  # the upload's data and its record, once there is space


async def test_blob_commit_without_an_inode_left_is_507_and_keeps_nothing(
        start_mirror, http, tmpfs):
    disk = tmpfs("size=8m,nr_inodes=400")
    mirror = await start_mirror(root=disk)
    data = os.urandom(64 * 1024)
    digest = digest_of(data)
    location = await start(http, mirror, "disk/commit")
    async with http.patch(location, data=data) as resp:
        assert resp.status == 202
    # The commit has to create blobs/sha256/<first two hex digits>/: no inode for it.
    assert not mirror.proxy.store.path(digest).parent.exists()
    spare = use_up_inodes(disk)
    async with http.put(f"{location}?digest={digest}") as resp:
        await assert_disk_full(resp, disk)
    assert mirror.proxy.store.size(digest) is None
    assert uploads(disk) == []
    for path in spare:
        path.unlink()


async def test_pull_that_cannot_spool_is_507_and_asks_no_upstream(
        start_mirror, http, upstream, tmpfs):
    disk = tmpfs("size=8m,nr_inodes=400")
    mirror = await start_mirror(root=disk)
    alpine = upstream.images["library/alpine"]
    digest = max(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    spare = use_up_inodes(disk)
    async with http.get(blob_url(mirror, digest)) as resp:
        await assert_disk_full(resp, disk)
    assert fetched(upstream, "GET", digest) == 0
    for path in spare:
        path.unlink()
    assert (await get(http, blob_url(mirror, digest)))[2] == alpine.blobs[digest]


async def read_all_or_short(http, url) -> tuple[bool, bytes]:
    """(whole, body): a response that ended short is not whole."""
    received = bytearray()
    async with http.get(url) as resp:
        assert resp.status == 200
        try:
            async for chunk in resp.content.iter_any():
                received += chunk
        except aiohttp.ClientPayloadError:
            return False, bytes(received)
    return True, bytes(received)


async def test_memory_held_for_a_full_disk_is_bounded_over_all_fills(
        start_mirror, http, upstream, tmpfs, monkeypatch):
    """Each of two 3 MiB blobs alone fits the memory bound on a full disk; at once they do
    not, and one of them fails rather than the bound growing with the number of fills."""
    monkeypatch.setattr(fill_module, "OVERFLOW_LIMIT", 4 * MiB)
    disk = tmpfs("size=2m")
    mirror = await start_mirror(root=disk)
    alpine = upstream.images["library/alpine"]
    first = max(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    pushed = upstream.push_image("disk/overflow", "v1", "overflow", size=3 * MiB)
    second = max(pushed.layer_digests, key=lambda d: len(pushed.blobs[d]))
    expected = {first: alpine.blobs[first], second: pushed.blobs[second]}
    urls = {first: blob_url(mirror, first), second: blob_url(mirror, second, "disk/overflow")}
    fill_up(disk)  # nothing spools: every byte of a fill waits in memory
    fills = mirror.proxy.fills
    for digest in (first, second):
        assert await read_all_or_short(http, urls[digest]) == (True, expected[digest])
        await committed(mirror, digest)
    for digest in (first, second):
        upstream.proxy.throttle(4 * MiB, match=digest)
    results = await asyncio.gather(*(read_all_or_short(http, urls[d]) for d in (first, second)))
    for digest, (whole, body) in zip((first, second), results):
        assert body == expected[digest][:len(body)]
        assert (whole and body == expected[digest]) or len(body) < len(expected[digest])
    assert [whole for whole, _ in results].count(False) >= 1
    assert 3 * MiB <= fills.overflow.peak <= 4 * MiB
    for digest in (first, second):
        await committed(mirror, digest)
    assert fills.overflow.used == 0
    assert mirror.blob_files() == [] and list((disk / "tmp").iterdir()) == []
