"""The in-memory tier: hot values with a time to live (upstream tokens, tag records).

It sits behind aiocache's interface: in one process a SimpleMemoryCache; with several
replicas (`cluster.redis`) aiocache's Redis backend, so a token one replica obtained and a
tag record one replica revalidated are every replica's at once. Values here are only ever
a copy of what the durable metadata holds, or something cheap to fetch again (a token), so
losing them costs at most one upstream request each — which is also why a Redis that does
not answer is not an error here: the process's own copy answers instead, and the failure is
logged once per outage.

Values cross Redis as JSON, never pickle: whoever can write to the Redis must not be able
to run code in the mirror.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from aiocache import SimpleMemoryCache
from aiocache.serializers import BaseSerializer

from .metadata import TagRecord

log = logging.getLogger("mirror")

# After a failure, Redis is asked again only after this long: a Redis that times out
# must not add its timeout to every request.
RETRY_SECONDS = 5.0


class Memory:
    def __init__(self, redis_url: str | None = None, namespace: str = "mirror:memory:"):
        self._local = SimpleMemoryCache()
        self._shared = None
        if redis_url is not None:
            from aiocache import RedisCache

            url = urlsplit(redis_url)
            db = url.path.strip("/")
            self._shared = RedisCache(
                serializer=ValueSerializer(), namespace=namespace,
                endpoint=url.hostname, port=url.port or 6379, db=int(db) if db.isdigit() else 0,
                password=unquote(url.password) if url.password else None,
                ssl=url.scheme == "rediss", create_connection_timeout=2,
                connection_pool_kwargs={"socket_timeout": 2, **(
                    {"username": unquote(url.username)} if url.username else {})})
        self._down = False
        self._retry_at = 0.0

    def _use_shared(self) -> bool:
        return self._shared is not None and time.monotonic() >= self._retry_at

    async def get(self, key: str) -> Any:
        if self._use_shared():
            try:
                value = await self._shared.get(key)
                self._up()
                return value
            except Exception as e:  # noqa: BLE001 — any Redis failure: answer locally
                self._failed(e)
        return await self._local.get(key)

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        await self._local.set(key, value, ttl=ttl)
        if self._use_shared():
            try:
                # Redis takes whole seconds here; a shorter life is rounded up, not dropped.
                await self._shared.set(key, value, ttl=max(1, round(ttl)) if ttl else None)
                self._up()
            except Exception as e:  # noqa: BLE001
                self._failed(e)

    async def delete(self, key: str) -> None:
        await self._local.delete(key)
        if self._use_shared():
            try:
                await self._shared.delete(key)
                self._up()
            except Exception as e:  # noqa: BLE001
                self._failed(e)

    def _failed(self, error: Exception) -> None:
        self._retry_at = time.monotonic() + RETRY_SECONDS
        if not self._down:
            self._down = True
            log.warning("the shared memory tier (Redis) failed, answering from this "
                        "replica's own copy until it is back: %s", error)

    def _up(self) -> None:
        if self._down:
            self._down = False
            log.info("the shared memory tier (Redis) answers again")

    async def close(self) -> None:
        await self._local.close()
        if self._shared is not None:
            try:
                await self._shared.close()
            except Exception:  # noqa: BLE001 — closing a connection that is already gone
                pass


class ValueSerializer(BaseSerializer):
    """Strings (tokens) and TagRecords as JSON."""

    DEFAULT_ENCODING = "utf-8"

    def dumps(self, value: Any) -> str:
        if isinstance(value, TagRecord):
            return json.dumps({"tag_record": [value.digest, value.media_type, value.size,
                                              value.checked_at]})
        return json.dumps({"value": value})

    def loads(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            document = json.loads(value)
            if "tag_record" in document:
                return TagRecord(*document["tag_record"])
            return document.get("value")
        except (ValueError, TypeError, AttributeError):
            return None  # something else wrote the key: a miss, not a crash
