"""Lease: one holder at a time for a named job (the eviction pass, a digest's fill), with a
time limit.

redis-py's Lock does exactly this: `SET key holder NX PX ttl` takes it; the holder renews
(`reacquire`) while it works and deletes it when done — both only if the key still names
the holder, checked inside Redis, so a holder whose lease ran out never renews or deletes
the next holder's. A holder that dies simply stops renewing: the lease expires and another
replica takes it. The value is the holder's own string (FillLeases puts where its fill can
be streamed from in it), so others can read who holds it with a plain GET.
"""

from __future__ import annotations

import logging
from typing import Any

from redis import exceptions as redis_errors

log = logging.getLogger("mirror")


class Lease:
    def __init__(self, redis: Any, key: str, holder: str, ttl: float):
        self.key = key
        self.holder = holder
        self.ttl_ms = int(ttl * 1000)
        # Not blocking: a replica that does not get the lease follows the holder instead.
        self._lock = redis.lock(key, timeout=ttl, blocking=False, thread_local=False)

    async def take(self) -> bool:
        """Take the lease if it is free; Redis errors are the caller's to handle."""
        return bool(await self._lock.acquire(token=self.holder))

    async def acquire(self) -> bool:
        try:
            return await self.take()
        except redis_errors.RedisError as e:
            log.warning("cannot take the lease %s: %s", self.key, e)
            return False

    async def renew(self) -> bool:
        """Extend the lease; False when it is no longer ours (stop working)."""
        try:
            return bool(await self._lock.reacquire())
        except redis_errors.LockError:  # expired and maybe taken by another: not ours
            return False
        except redis_errors.RedisError as e:
            log.warning("cannot renew the lease %s: %s", self.key, e)
            return False

    async def release(self) -> None:
        try:
            await self._lock.release()
        except redis_errors.LockError:
            pass  # it ran out (and may be another's now): nothing of ours to delete
        except redis_errors.RedisError as e:
            log.warning("cannot release the lease %s (it expires by itself): %s", self.key, e)
