"""Replicas: each replica's heartbeat in Redis, with the blobs it is sending right now.

    <cluster>:replica:<name>   JSON {"name", "started", "seen", "holds": [digest, ...]}
                               (expires after TTL: a replica that stops beating is gone)

Every `BEAT` seconds a replica writes its entry. The evicting replica reads every entry
before a pass: a blob another replica is sending stays, as one this replica is sending
does (cache/budget.py's hold). A hold taken since the last beat is covered by the ledger's
clock instead: the hit touched the blob, and keep_recent is longer than a beat plus a
flush, so a blob used that recently is not evicted anyway.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Iterable

from redis import exceptions as redis_errors

log = logging.getLogger("mirror")

BEAT = 2.0
TTL = 10.0


class Replicas:
    def __init__(self, redis: Any, prefix: str, name: str,
                 holds: Callable[[], Iterable[str]] = lambda: ()):
        self.redis = redis
        self.prefix = prefix
        self.name = name
        self.holds = holds  # the digests this replica's responses are sending
        self.started = time.time()

    def _key(self, name: str) -> str:
        return f"{self.prefix}replica:{name}"

    async def beat(self) -> bool:
        entry = {"name": self.name, "started": self.started, "seen": time.time(),
                 "holds": sorted(self.holds())}
        try:
            await self.redis.set(self._key(self.name), json.dumps(entry), px=int(TTL * 1000))
            return True
        except redis_errors.RedisError as e:
            log.debug("replica heartbeat failed: %s", e)
            return False

    async def alive(self) -> list[dict]:
        """Every replica that beat within TTL, this one included."""
        entries = []
        try:
            keys = [key async for key in self.redis.scan_iter(match=self._key("*"), count=100)]
            values = await self.redis.mget(keys) if keys else []
        except redis_errors.RedisError as e:
            log.warning("cannot list the cluster's replicas: %s", e)
            return []
        for value in values:
            if value is None:
                continue
            try:
                entries.append(json.loads(value))
            except ValueError:
                continue
        return sorted(entries, key=lambda e: e.get("name", ""))

    async def held_elsewhere(self) -> set[str]:
        """The blobs other replicas are sending (as of their last beat)."""
        return {digest for entry in await self.alive() if entry.get("name") != self.name
                for digest in entry.get("holds", [])}

    async def leave(self) -> None:
        try:
            await self.redis.delete(self._key(self.name))
        except redis_errors.RedisError:
            pass
