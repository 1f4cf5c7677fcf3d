"""ObjectStore against a real SeaweedFS: bytes round-trip exactly, nothing half-written is
ever visible, and every failure of the store arrives as one of our StorageErrors.

Each test has a bucket of its own on the session's SeaweedFS; the outage test starts a
second SeaweedFS of its own so that stopping it leaves the shared one alone. Assertions
look behind the code under test with a plain botocore client (`seaweed.client()`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import aiohttp
import pytest

from mirror.errors import RangeInvalid, StorageError
from mirror.storage.s3 import ObjectMissing, ObjectStore, ObjectStoreUnavailable, S3Settings
from mirror.storage.s3_io import CHUNK
from tests.support.seaweed import SeaweedFS

MiB = 1 << 20


@pytest.fixture
async def open_store(s3_settings: S3Settings):
    """open_store(prefix=..., part_size=...) -> an ObjectStore on this test's bucket."""
    stores: list[ObjectStore] = []

    async def open_(**changes) -> ObjectStore:
        stores.append(await ObjectStore.open(dataclasses.replace(s3_settings, **changes)))
        return stores[-1]

    yield open_
    for store in stores:
        await store.close()


@pytest.fixture
async def store(open_store) -> ObjectStore:
    return await open_store(prefix="test/", part_size=5 * MiB)


def uploads_in(seaweed: SeaweedFS, bucket: str) -> list[str]:
    """Keys of the multipart uploads in progress in `bucket`, as the server lists them."""
    client = seaweed.client()
    try:
        return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    finally:
        client.close()


def keys_in(seaweed: SeaweedFS, bucket: str) -> list[str]:
    client = seaweed.client()
    try:
        return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    finally:
        client.close()


async def names(store: ObjectStore, prefix: str = "") -> list[str]:
    return [name async for name, _, _ in store.list(prefix)]


async def body_of(store: ObjectStore, name: str, start: int = 0, end: int | None = None):
    body = await store.read(name, start, end)
    async with body:
        chunks = [chunk async for chunk in body]
    assert all(len(c) <= CHUNK for c in chunks)
    return body, b"".join(chunks)


# -- whole objects ------------------------------------------------------------------------


async def test_put_get_size_delete_round_trip(store, seaweed, s3_settings):
    data = os.urandom(1000)
    assert await store.put("blobs/sha256/aa", data, metadata={"digest": "sha256:aa"})
    assert await store.get("blobs/sha256/aa") == data
    assert await store.size("blobs/sha256/aa") == 1000
    assert keys_in(seaweed, s3_settings.bucket) == ["test/blobs/sha256/aa"]
    client = seaweed.client()
    head = client.head_object(Bucket=s3_settings.bucket, Key="test/blobs/sha256/aa")
    client.close()
    assert head["Metadata"] == {"digest": "sha256:aa"}

    await store.delete("blobs/sha256/aa")
    assert await store.get("blobs/sha256/aa") is None
    assert await store.size("blobs/sha256/aa") is None
    await store.delete("blobs/sha256/aa")  # idempotent
    with pytest.raises(ObjectMissing):
        await store.read("blobs/sha256/aa")
    assert keys_in(seaweed, s3_settings.bucket) == []


async def test_empty_object_round_trips(store):
    assert await store.put("empty", b"")
    assert await store.get("empty") == b""
    body, data = await body_of(store, "empty")
    assert (data, body.size, body.length) == (b"", 0, 0)


async def test_read_ranges_are_byte_exact(store):
    data = os.urandom(3 * MiB + 123)
    await store.put("blob", data)
    last = len(data) - 1
    for start, end in [(0, None), (1000, None), (5, 99), (last, last), (last, None),
                       (0, 0), (CHUNK - 1, CHUNK + 1)]:
        body, got = await body_of(store, "blob", start, end)
        expected = data[start:None if end is None else end + 1]
        assert got == expected, (start, end)
        assert body.size == len(data), (start, end)
        assert body.length == len(expected), (start, end)


async def test_read_past_the_end_is_range_invalid(store):
    await store.put("blob", b"0123456789")
    with pytest.raises(RangeInvalid):
        await store.read("blob", 10)
    body, got = await body_of(store, "blob", 8, 100)  # an end past the end is clipped
    assert (got, body.size, body.length) == (b"89", 10, 2)


async def test_put_if_none_match_keeps_the_first(store):
    assert await store.put("blobs/sha256/bb", b"first", if_none_match=True) is True
    assert await store.put("blobs/sha256/bb", b"second", if_none_match=True) is False
    assert await store.get("blobs/sha256/bb") == b"first"
    assert await store.put("blobs/sha256/bb", b"third") is True  # unconditional overwrites
    assert await store.get("blobs/sha256/bb") == b"third"


# -- streamed writes ----------------------------------------------------------------------


async def test_writer_object_appears_only_after_complete(store, seaweed, s3_settings):
    data = os.urandom(12 * MiB + 5)
    writer = store.writer("blobs/sha256/cc")
    for start in range(0, len(data), MiB + 7):  # pieces that do not line up with parts
        await writer.write(data[start:start + MiB + 7])
    # Two full parts went out already (not buffered whole), yet nothing is visible.
    assert uploads_in(seaweed, s3_settings.bucket) == ["test/blobs/sha256/cc"]
    assert await store.size("blobs/sha256/cc") is None
    assert await names(store) == []
    assert keys_in(seaweed, s3_settings.bucket) == []

    await writer.complete()
    assert await store.size("blobs/sha256/cc") == len(data)
    assert await store.get("blobs/sha256/cc") == data
    assert await names(store) == ["blobs/sha256/cc"]
    assert uploads_in(seaweed, s3_settings.bucket) == []
    client = seaweed.client()
    etag = client.head_object(Bucket=s3_settings.bucket, Key="test/blobs/sha256/cc")["ETag"]
    client.close()
    assert etag.strip('"').endswith("-3")  # 5 + 5 + 2 MiB


async def test_writer_of_one_part_is_a_single_put(store, seaweed, s3_settings):
    data = os.urandom(5 * MiB)  # exactly one part: no multipart upload at all
    async with store.writer("one") as writer:
        await writer.write(data[:MiB])
        await writer.write(data[MiB:])
        assert uploads_in(seaweed, s3_settings.bucket) == []
        assert await store.size("one") is None
        await writer.complete()
    assert await store.get("one") == data
    client = seaweed.client()
    etag = client.head_object(Bucket=s3_settings.bucket, Key="test/one")["ETag"]
    client.close()
    assert "-" not in etag


async def test_writer_abort_leaves_nothing(store, seaweed, s3_settings):
    writer = store.writer("blobs/sha256/dd")
    await writer.write(os.urandom(7 * MiB))
    assert uploads_in(seaweed, s3_settings.bucket) == ["test/blobs/sha256/dd"]
    await writer.abort()
    await writer.abort()  # twice is fine
    assert await store.size("blobs/sha256/dd") is None
    assert keys_in(seaweed, s3_settings.bucket) == []
    assert uploads_in(seaweed, s3_settings.bucket) == []
    assert await store.abort_stale_uploads(0) == 0
    with pytest.raises(StorageError, match="already aborted"):
        await writer.write(b"more")


async def test_writer_leaving_by_exception_leaves_nothing(store, seaweed, s3_settings):
    with pytest.raises(RuntimeError, match="digest mismatch"):
        async with store.writer("blobs/sha256/ee") as writer:
            await writer.write(os.urandom(6 * MiB))
            raise RuntimeError("digest mismatch")
    async with store.writer("blobs/sha256/ff") as writer:  # no complete(): aborted too
        await writer.write(os.urandom(6 * MiB))
    assert keys_in(seaweed, s3_settings.bucket) == []
    assert uploads_in(seaweed, s3_settings.bucket) == []


async def test_abort_stale_uploads_takes_only_old_uploads_under_its_prefix(
        open_store, seaweed, s3_settings):
    mine = await open_store(prefix="a/", part_size=5 * MiB)
    other = await open_store(prefix="b/", part_size=5 * MiB)
    killed = mine.writer("blobs/sha256/11")     # as a replica killed mid-write leaves it
    await killed.write(os.urandom(6 * MiB))
    elsewhere = other.writer("blobs/sha256/22")
    await elsewhere.write(os.urandom(6 * MiB))
    assert sorted(uploads_in(seaweed, s3_settings.bucket)) == ["a/blobs/sha256/11",
                                                                "b/blobs/sha256/22"]
    assert await mine.abort_stale_uploads(3600) == 0  # young: maybe still being written
    await asyncio.sleep(1.1)  # Initiated has one-second resolution
    assert await mine.abort_stale_uploads(0) == 1
    assert uploads_in(seaweed, s3_settings.bucket) == ["b/blobs/sha256/22"]
    with pytest.raises(ObjectMissing):  # its upload is gone: completing cannot succeed
        await killed.complete()
    assert await mine.size("blobs/sha256/11") is None
    await elsewhere.abort()


async def test_upload_file_is_byte_exact(store, tmp_path):
    data = os.urandom(20 * MiB)
    spool = tmp_path / "spool"
    spool.write_bytes(data)
    await store.upload_file("blobs/sha256/99", spool, len(data))
    assert await store.size("blobs/sha256/99") == len(data)
    body, got = await body_of(store, "blobs/sha256/99")
    assert got == data and body.size == len(data)


async def test_upload_file_of_the_wrong_size_writes_nothing(store, seaweed, s3_settings,
                                                            tmp_path):
    spool = tmp_path / "spool"
    spool.write_bytes(os.urandom(6 * MiB))
    with pytest.raises(StorageError, match="not the 7340032 expected"):
        await store.upload_file("short", spool, 7 * MiB)
    with pytest.raises(StorageError, match="not the 1024 expected"):
        await store.upload_file("long", spool, 1024)
    with pytest.raises(StorageError, match="missing"):
        await store.upload_file("gone", tmp_path / "missing", 10)
    assert keys_in(seaweed, s3_settings.bucket) == []
    assert uploads_in(seaweed, s3_settings.bucket) == []


# -- listing and deleting -----------------------------------------------------------------


async def test_list_crosses_pages_and_delete_many_crosses_batches(store, seaweed,
                                                                 s3_settings):
    many = [f"uploads/u1/{n}" for n in range(1100)]
    gate = asyncio.Semaphore(64)

    async def put(name: str) -> None:
        async with gate:
            await store.put(name, name.encode())

    await asyncio.gather(*(put(n) for n in [*many, "uploads/u2/0", "blobs/sha256/00"]))
    listed = [item async for item in store.list("uploads/u1/")]
    assert sorted(name for name, _, _ in listed) == sorted(many)
    assert all(size == len(name) for name, size, _ in listed)
    assert all(abs(mtime - time.time()) < 300 for _, _, mtime in listed)
    assert len(await names(store)) == 1102

    await store.delete_many([*many, "uploads/u1/never-there"])
    assert await names(store) == ["blobs/sha256/00", "uploads/u2/0"]
    assert sorted(keys_in(seaweed, s3_settings.bucket)) == ["test/blobs/sha256/00",
                                                            "test/uploads/u2/0"]


# -- presigned URLs -----------------------------------------------------------------------


async def test_presigned_url_serves_the_bytes_until_it_expires(store):
    data = os.urandom(100_000)
    await store.put("blobs/sha256/77", data)
    url = await store.presign_get("blobs/sha256/77")
    short = await store.presign_get("blobs/sha256/77", expires=1)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == data
        await asyncio.sleep(2)
        async with http.get(short) as resp:
            assert resp.status == 403
            assert b"expired" in (await resp.read()).lower()
        async with http.get(url) as resp:  # the long one still works
            assert resp.status == 200


# -- refusals and outages -----------------------------------------------------------------


async def test_wrong_credentials_are_a_storage_error_naming_the_key(seaweed, s3_settings):
    for access_key, secret in [("nobody-here", "not-a-secret-xyz"),
                               (seaweed.access_key, "wrong-secret-xyz")]:
        settings = dataclasses.replace(s3_settings, access_key=access_key,
                                       secret_key=secret)
        with pytest.raises(StorageError) as caught:
            await ObjectStore.open(settings)
        assert not isinstance(caught.value, ObjectStoreUnavailable)
        assert access_key in caught.value.message
        assert secret not in caught.value.message
        assert "credentials" in caught.value.message


async def test_missing_bucket_is_named(seaweed):
    with pytest.raises(StorageError, match="bucket no-such-bucket-here does not exist") as e:
        await ObjectStore.open(seaweed.settings("no-such-bucket-here"))
    assert not isinstance(e.value, ObjectStoreUnavailable)


async def test_part_size_below_the_s3_minimum_is_refused():
    with pytest.raises(StorageError, match="5 MiB"):
        await ObjectStore.open(S3Settings(endpoint="http://127.0.0.1:9", part_size=MiB))


@pytest.fixture
def own_seaweed(tmp_path):
    """A SeaweedFS for one test, to stop and start without disturbing the shared one."""
    server = SeaweedFS(tmp_path / "seaweed")
    try:
        yield server.start()
    finally:
        server.kill()


async def every_call_unavailable(store: ObjectStore, spool, within: float) -> None:
    """Every network method of the store (and opening another one) raises
    ObjectStoreUnavailable, all of them within `within` seconds. (presign_get is missing:
    it signs locally and never asks the store.)"""

    async def small_write():
        async with store.writer("w1") as writer:
            await writer.write(b"x")
            await writer.complete()

    async def big_write():
        async with store.writer("w2") as writer:
            await writer.write(os.urandom(6 * MiB))

    async def listing():
        return [item async for item in store.list("")]

    calls = {
        "check": store.check(), "size": store.size("kept"), "read": store.read("kept"),
        "get": store.get("kept"), "put": store.put("new", b"x"),
        "put if-none-match": store.put("new", b"x", if_none_match=True),
        "small write": small_write(), "big write": big_write(),
        "upload_file": store.upload_file("file", spool, 6 * MiB),
        "delete": store.delete("kept"), "delete_many": store.delete_many(["a", "b"]),
        "list": listing(), "abort_stale_uploads": store.abort_stale_uploads(0),
        "open": ObjectStore.open(store.settings),
    }
    began = time.monotonic()
    results = await asyncio.gather(*calls.values(), return_exceptions=True)
    elapsed = time.monotonic() - began
    for what, result in zip(calls, results):
        assert isinstance(result, ObjectStoreUnavailable), (what, result)
        assert result.status == 503 and result.headers == {"Retry-After": "10"}
        assert store.settings.endpoint in result.message, what
        assert store.settings.bucket in result.message, what
    assert elapsed < within, f"the store took {elapsed:.1f}s to be declared unavailable"


async def test_every_method_is_unavailable_while_s3_is_down_and_works_after(
        own_seaweed, tmp_path):
    store = await ObjectStore.open(own_seaweed.settings(own_seaweed.new_bucket(),
                                                        part_size=5 * MiB))
    try:
        await store.put("kept", b"before the outage")
        spool = tmp_path / "spool"
        spool.write_bytes(os.urandom(6 * MiB))

        stopping = asyncio.ensure_future(asyncio.to_thread(own_seaweed.stop))
        # For the ~15 s SeaweedFS takes to exit after SIGTERM its S3 port still answers:
        # 500 InternalError at once, except DeleteObject(s), which hang until the process
        # is gone and then find the connection reset.
        while not stopping.done():
            try:
                await store.get("kept")
            except ObjectStoreUnavailable:
                break
        if not stopping.done():
            await every_call_unavailable(store, spool, within=25)
        await stopping
        await every_call_unavailable(store, spool, within=15)  # now refused

        await asyncio.to_thread(own_seaweed.start)
        await store.check()
        assert await store.get("kept") == b"before the outage"
        assert await store.put("new", b"after", if_none_match=True)
        assert await names(store) == ["kept", "new"]
    finally:
        await store.close()
