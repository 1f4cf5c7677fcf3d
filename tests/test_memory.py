"""The memory tier: tokens and hot tag records, shared through Redis by every replica.

A record one replica sets is the other's at once; values cross Redis as JSON (a pickled
value another writer left is a miss, never code run); a Redis that stops answering is not
an error (the replica's own copy answers) and costs one failed attempt per RETRY_SECONDS,
not one per request."""

import asyncio
import pickle

import pytest

from mirror.storage import memory as memory_module
from mirror.storage.memory import Memory
from mirror.storage.metadata import TagRecord


async def test_a_record_set_on_one_replica_is_read_on_another(redis_server, redis_url_prefix):
    url, prefix = redis_url_prefix
    one, two = Memory(url, prefix), Memory(url, prefix)
    record = TagRecord("sha256:" + "a" * 64, "application/vnd.oci.image.index.v1+json", 512,
                       1700000000.5)
    try:
        await one.set("t:docker.io/library/alpine:3:oci", record, ttl=30)
        await one.set("token:docker.io:pull", "eyJhbGciOi", ttl=0.4)
        assert await two.get("t:docker.io/library/alpine:3:oci") == record
        assert await two.get("token:docker.io:pull") == "eyJhbGciOi"
        await two.delete("t:docker.io/library/alpine:3:oci")
        assert await one._shared.get("t:docker.io/library/alpine:3:oci") is None
        await asyncio.sleep(1.2)  # a sub-second TTL is rounded up to Redis's second, not dropped
        assert await one._shared.get("token:docker.io:pull") is None
    finally:
        await one.close()
        await two.close()


async def test_a_pickled_value_in_redis_is_a_miss_not_code(redis_server, redis_url_prefix):
    url, prefix = redis_url_prefix
    memory = Memory(url, prefix)
    try:
        await memory._shared.client.set(f"{prefix}evil", pickle.dumps(TagRecord("d", "m", 1, 0)))
        assert await memory.get("evil") is None
    finally:
        await memory.close()


async def test_redis_down_answers_from_the_local_copy_and_retries_only_now_and_then(
        start_redis, monkeypatch):
    server = start_redis()
    memory = Memory(server.url, "m:")
    attempts = 0
    real_get = memory._shared.get

    async def counted_get(*args, **kwargs):
        nonlocal attempts
        attempts += 1
        return await real_get(*args, **kwargs)

    monkeypatch.setattr(memory._shared, "get", counted_get)
    try:
        await memory.set("k", "v", ttl=60)
        server.stop()
        assert [await memory.get("k") for _ in range(20)] == ["v"] * 20
        assert attempts == 1  # the first failure opens the breaker for RETRY_SECONDS
        monkeypatch.setattr(memory_module, "RETRY_SECONDS", 0.0)
        memory._retry_at = 0.0
        assert await memory.get("k") == "v"
        assert attempts == 2
    finally:
        await memory.close()


@pytest.mark.parametrize("value", ["", "plain", 0])
def test_the_serializer_round_trips_what_the_tier_holds(value):
    serializer = memory_module.ValueSerializer()
    assert serializer.loads(serializer.dumps(value)) == value
