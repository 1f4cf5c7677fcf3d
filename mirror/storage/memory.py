"""The in-memory tier: hot values with a time to live (upstream tokens, tag records).

It sits behind aiocache's interface so that several mirror instances can later share one
Redis backend by changing only `Memory.__init__`. Values here are only ever a copy of what
the durable index holds, or something cheap to fetch again (a token), so losing them on a
restart costs at most one upstream request each.
"""

from __future__ import annotations

from typing import Any

from aiocache import SimpleMemoryCache


class Memory:
    def __init__(self) -> None:
        self._cache = SimpleMemoryCache()

    async def get(self, key: str) -> Any:
        return await self._cache.get(key)

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        await self._cache.set(key, value, ttl=ttl)

    async def delete(self, key: str) -> None:
        await self._cache.delete(key)

    async def close(self) -> None:
        await self._cache.close()
