"""A replica that missed something just before another replica's fetch of it ended.

Each replica checks the shared metadata (or the bucket) first and claims the fetch in Redis
only on a miss. Between the two another replica may finish the fetch, store what it got and
release its lease: the claim then succeeds, and unless the holder looks again it fetches a
second time. A clean-clone CI run (2 cores, loaded) caught that as two upstream GETs of one
manifest and one blob for 32 clients over 3 replicas (test_cluster_fills.py). Here the two
replicas are two FillLeases on the real Redis, and the miss-then-claim order is forced.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from contextlib import asynccontextmanager

import aiohttp
import pytest
from redis.asyncio import from_url

from mirror import config as cfg
from mirror.cache.fills import Fills
from mirror.cache.shared import shared_fill
from mirror.cluster.fills import FillLeases, Holding
from mirror.errors import Unavailable
from mirror.reference import Route
from mirror.storage.blobs import BlobStore
from mirror.storage.s3 import ObjectStore
from mirror.storage.sqlite import SqliteMetadata

SECRET = "test-cluster-secret-0123456789"


@pytest.fixture
async def replicas(redis_url_prefix):
    """Two replicas' lease clients on one Redis key space: (r1, r2, the Redis client)."""
    url, prefix = redis_url_prefix
    redis = from_url(url)
    async with aiohttp.ClientSession() as session:
        yield (FillLeases(redis, prefix, "r1", "http://127.0.0.1:9", SECRET, session),
               FillLeases(redis, prefix, "r2", "http://127.0.0.1:9", SECRET, session),
               redis)
    await redis.aclose()


async def test_a_flight_that_ended_between_a_miss_and_the_claim_is_not_run_again(replicas):
    r1, r2, redis = replicas
    shared: dict[str, bytes] = {}  # the shared metadata
    runs: list[str] = []

    def fetch(replica: str):
        async def run() -> bytes:
            runs.append(replica)
            shared["manifest"] = b"the manifest"
            return shared["manifest"]
        return run

    async def stored() -> bytes | None:
        return shared.get("manifest")

    assert await stored() is None  # r2 misses...
    assert await r1.once("digest:sha256:abc", fetch("r1"), stored) == b"the manifest"
    # ...and claims only now, with r1's lease released: it must take what r1 stored.
    assert await r2.once("digest:sha256:abc", fetch("r2"), stored) == b"the manifest"
    assert runs == ["r1"]
    assert await redis.exists(f"{r2.prefix}fill:flight:digest:sha256:abc") == 0


async def test_a_blob_committed_between_a_miss_and_the_claim_is_read_from_the_bucket(
        replicas, tmp_path, s3_settings):
    """r2 misses the layer, then r1's fill commits it to the bucket and releases the lease;
    r2's claim succeeds, and its fill must read the bucket, not the upstream again."""
    _, r2, redis = replicas
    bucket = await ObjectStore.open(s3_settings)
    metadata = SqliteMetadata(tmp_path / "r2")
    r1_store = BlobStore(tmp_path / "r1", metadata, bucket)
    r2_store = BlobStore(tmp_path / "r2", metadata, bucket, local_size=1 << 20)
    blob = os.urandom(300_000)
    digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"
    route = Route(cfg.Upstream("docker.io", "http://127.0.0.1:9", default=True), "team/app")
    asked: list[int] = []

    @asynccontextmanager
    async def from_upstream(start: int):
        asked.append(start)
        raise Unavailable("a second upstream fetch")
        yield

    try:
        assert await r2_store.stat(digest) is None  # r2 misses; then r1's fill commits it
        fd, spool = r1_store.spool()
        os.write(fd, blob)
        os.close(fd)
        await r1_store.commit_async(spool, digest)
        fill, fd = await shared_fill(r2, Fills(r2_store), r2_store, route, digest,
                                     from_upstream)
        try:
            while not fill.done:
                await asyncio.sleep(0.01)
            assert (asked, fill.error, fill.committed) == ([], None, True)
            assert os.pread(fd, len(blob) + 1, 0) == blob
        finally:
            os.close(fd)
        assert r2_store.path(digest).read_bytes() == blob  # into r2's local tier
        assert await redis.exists(f"{r2.prefix}fill:{digest}") == 0  # its claim let go
    finally:
        await metadata.close()
        await bucket.close()


class HeldBody:
    """A body that sends its bytes when `go` is set: a fill that ends when the test says."""

    def __init__(self, data: bytes, go: asyncio.Event):
        self.start, self.size, self._data, self._go = 0, len(data), data, go

    async def chunks(self):
        await self._go.wait()
        yield self._data


async def test_a_local_fill_that_ends_while_the_claim_is_let_go_is_joined_not_started_again(
        replicas, tmp_path, monkeypatch):
    """A request here finds the lease free (Holding) but a fill of the digest running here
    (another request started it meanwhile): it lets its claim go and joins that fill. The
    fill may end during that release; joining only afterwards found none and started a
    second upstream fetch (a loaded run of 32 clients over 3 replicas, config blob)."""
    _, r2, _ = replicas
    metadata = SqliteMetadata(tmp_path)
    store = BlobStore(tmp_path, metadata)
    fills = Fills(store)
    blob = os.urandom(5000)
    digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"
    route = Route(cfg.Upstream("docker.io", "http://127.0.0.1:9", default=True), "team/app")
    go, asked = asyncio.Event(), []

    @asynccontextmanager
    async def first(start: int):
        yield HeldBody(blob, go)

    @asynccontextmanager
    async def from_upstream(start: int):
        asked.append(start)
        raise Unavailable("a second upstream fetch")
        yield

    running, first_fd = fills.join(digest, first, route="replica r3")
    release = Holding.release

    async def release_after_the_fill_ended(self):
        go.set()
        while digest in fills.active:
            await asyncio.sleep(0.005)
        await release(self)

    monkeypatch.setattr(Holding, "release", release_after_the_fill_ended)
    try:
        fill, fd = await shared_fill(r2, fills, store, route, digest, from_upstream)
        os.close(fd)
        assert fill is running and running.committed
        assert asked == [] and digest not in fills.active
        assert store.path(digest).read_bytes() == blob
    finally:
        os.close(first_fd)
        await metadata.close()
