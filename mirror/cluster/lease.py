"""Lease: one holder at a time for a named job (the eviction pass), with a time limit.

`SET key holder NX PX ttl` takes it; the holder renews it while it works and deletes it
when done — both only if the key still names the holder (a Lua compare-and-act, so a
holder whose lease ran out never renews or deletes the next holder's). A holder that dies
simply stops renewing: the lease expires and another replica takes it.
"""

from __future__ import annotations

import logging
from typing import Any

from redis import exceptions as redis_errors

log = logging.getLogger("mirror")

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, redis: Any, key: str, holder: str, ttl: float):
        self.redis = redis
        self.key = key
        self.holder = holder
        self.ttl_ms = int(ttl * 1000)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)

    async def acquire(self) -> bool:
        try:
            return bool(await self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms))
        except redis_errors.RedisError as e:
            log.warning("cannot take the lease %s: %s", self.key, e)
            return False

    async def renew(self) -> bool:
        """Extend the lease; False when it is no longer ours (stop working)."""
        try:
            return bool(await self._renew(keys=[self.key], args=[self.holder, self.ttl_ms]))
        except redis_errors.RedisError as e:
            log.warning("cannot renew the lease %s: %s", self.key, e)
            return False

    async def release(self) -> None:
        try:
            await self._release(keys=[self.key], args=[self.holder])
        except redis_errors.RedisError as e:
            log.warning("cannot release the lease %s (it expires by itself): %s", self.key, e)

    async def holder_now(self) -> str | None:
        try:
            value = await self.redis.get(self.key)
        except redis_errors.RedisError:
            return None
        return value.decode() if isinstance(value, bytes) else value
