"""RedisLedger: the usage ledger of the Redis metadata store — sizes, clocks, pins,
references, and the per-item eviction decision, shared by every replica.

    item:<digest>       hash  kind, size, atime, pinned      what is stored
    atime               zset  digest → atime                 the ledger by (atime, digest)
    total               int   bytes the ledger holds          (INCRBY/DECRBY with each item)
    pinned              set   pinned digests
    children:<digest>   set   what the item refers to
    parents:<digest>    set   what refers to the item

As in ledger.py, `record_blob` is queued, not awaited (redis_queue.py: written in order,
and every later call on this replica waits for it; kept through an outage for the next
`flush`), and `touch` only sets a clock in memory that `flush` writes.

Entering an item and raising a clock are one Lua script (ENTER): an insert-if-absent with a
running total, or a max, is a read that decides a write with nothing for Python to decide,
so a script does it atomically in one round trip and never has to retry. The writes whose
decision needs Python (eviction asks `in_use`; see also redis_metadata.py) are WATCH/MULTI
transactions (RedisStore._atomic).
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, WatchError

from .metadata import Evicted, Item, MetadataUnavailable
from .redis_queue import WriteQueue
from .redis_store import RedisStore, guarded, split_tag_id, text

log = logging.getLogger("mirror")

BATCH = 500  # items read per transaction

# KEYS: item, atime, total. ARGV: digest, kind, size, atime. An empty kind is a hit's clock:
# it raises an item's atime and never enters one. Returns the total.
ENTER = """
local old = redis.call('HGET', KEYS[1], 'atime')
if old then
  if tonumber(ARGV[4]) > tonumber(old) then
    redis.call('HSET', KEYS[1], 'atime', ARGV[4])
    redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  end
elseif ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'kind', ARGV[2], 'size', ARGV[3], 'atime', ARGV[4], 'pinned', '0')
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('INCRBY', KEYS[3], ARGV[3])
end
return redis.call('GET', KEYS[3]) or 0
"""


class RedisLedger(RedisStore):
    def __init__(self, client: aioredis.Redis, prefix: str = "mirror:", *,
                 url: str | None = None):
        super().__init__(client, prefix, url=url)
        self._enter_script = client.register_script(ENTER)
        self._clock: dict[str, float] = {}  # hits' clocks not written yet
        self._total = 0  # bytes the ledger holds, as of the last write or refresh_total
        self._queue = WriteQueue(self._write_blobs, self._failed, self.url)  # record_blob's
        self._removing: set[str] = set()  # evicted from the ledger, file not yet removed

    async def _start(self) -> None:
        await super()._start()
        self._total = int(await self.client.get(self.key("total")) or 0)

    # Entering items.
    async def _enter(self, pipe: Pipeline, digest: str, kind: str, size: int, atime: float,
                     refs: Iterable[str] = ()) -> None:
        """Queue an item's entry (or, kind "", a clock) on `pipe`; the last result is the
        total."""
        for child in refs:
            pipe.sadd(self.key("children", digest), child)
            pipe.sadd(self.key("parents", child), digest)
        await self._enter_script(keys=[self.key("item", digest), self.key("atime"),
                                       self.key("total")],
                                 args=[digest, kind, size, atime], client=pipe)

    def record_blob(self, digest: str, size: int, atime: float | None = None) -> None:
        self._queue.put((digest, size, time.time() if atime is None else atime))

    async def _write_blobs(self, batch: list[tuple[str, int, float]]) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            for digest, size, atime in batch:
                await self._enter(pipe, digest, "blob", size, atime)
            self._total = int((await pipe.execute())[-1])
        self._reachable()

    async def _settle(self) -> None:
        await self._queue.settle()

    def touch(self, digest: str) -> None:
        self._clock[digest] = time.time()

    @guarded
    async def flush(self) -> None:
        await self._queue.retry()  # what an outage left queued goes first, in order
        clock, self._clock = self._clock, {}
        if not clock:
            return
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                for digest, atime in clock.items():
                    await self._enter(pipe, digest, "", 0, atime)
                await pipe.execute()
        except RedisError:
            for digest, atime in clock.items():  # kept for the next flush
                self._clock[digest] = max(atime, self._clock.get(digest, 0.0))
            raise

    async def _final(self) -> None:
        try:
            await asyncio.wait_for(self.flush(), 5)
        except (MetadataUnavailable, TimeoutError) as e:  # closing must finish: logged
            log.warning("closing the metadata store with %d ledger writes and %d clocks not "
                        "written to Redis at %s: %s", len(self._queue), len(self._clock),
                        self.url, e)
        await self._queue.close()

    # Reading the ledger.
    def _item(self, digest: str, fields: dict, clock: bool = True) -> Item | None:
        if not fields:
            return None
        row = {text(k): text(v) for k, v in fields.items()}
        atime = float(row["atime"])
        if clock:
            atime = max(atime, self._clock.get(digest, 0.0))
        return Item(digest, row["kind"], int(row["size"]), atime, row["pinned"] == "1")

    async def _items(self, digests: list[str], clock: bool = True) -> list[Item]:
        async with self.client.pipeline(transaction=True) as pipe:
            for digest in digests:
                pipe.hgetall(self.key("item", digest))
            rows = await pipe.execute()
        items = (self._item(d, row, clock) for d, row in zip(digests, rows))
        return [item for item in items if item is not None]

    @guarded
    async def item(self, digest: str) -> Item | None:
        return self._item(digest, await self.client.hgetall(self.key("item", digest)))

    @guarded
    async def items(self) -> list[Item]:
        digests = [text(d) for d in await self.client.zrange(self.key("atime"), 0, -1)]
        found: list[Item] = []
        for start in range(0, len(digests), BATCH):
            found += await self._items(digests[start:start + BATCH])
        return found

    @guarded
    async def oldest(self, before: float, after: tuple[float, str] = (0.0, ""),
                     limit: int = 500) -> list[Item]:
        # A sorted set orders equal scores by member, bytewise: (atime, digest) exactly.
        # Redis has no "after this (score, member)" range, so the items sharing `after`'s
        # clock (rarely more than one) are read to skip those up to its digest. Two reads,
        # not one snapshot: a page may miss an item changed in between, as a page of SQLite
        # may miss one changed between pages; eviction decides each item again anyway.
        atime, digest = after
        ties = [text(d) for d in await self.client.zrange(self.key("atime"), atime, atime,
                                                           byscore=True)]
        rows = await self.client.zrange(self.key("atime"), atime, f"({before!r}", byscore=True,
                                        offset=bisect.bisect_right(ties, digest), num=limit)
        return await self._items([text(d) for d in rows], clock=False)

    @guarded
    async def parents(self, digest: str) -> list[str]:
        return sorted(text(d) for d in await self.client.smembers(self.key("parents", digest)))

    @guarded
    async def children(self, digest: str) -> list[str]:
        return sorted(text(d) for d in await self.client.smembers(self.key("children", digest)))

    @guarded
    async def pin(self, digest: str, pinned: bool = True) -> bool:
        item = self.key("item", digest)

        async def decide(pipe: Pipeline) -> bool:
            if not await pipe.exists(item):
                return False
            pipe.multi()
            pipe.hset(item, "pinned", int(pinned))
            if pinned:
                pipe.sadd(self.key("pinned"), digest)
            else:
                pipe.srem(self.key("pinned"), digest)
            return True
        return (await self._atomic([item], decide))[0]

    @guarded
    async def pinned_closure(self) -> set[str]:
        found = {text(d) for d in await self.client.smembers(self.key("pinned"))}
        frontier = list(found)
        while frontier:
            async with self.client.pipeline(transaction=False) as pipe:
                for digest in frontier:
                    pipe.smembers(self.key("children", digest))
                levels = await pipe.execute()
            frontier = [c for c in {text(c) for level in levels for c in level} if c not in found]
            found.update(frontier)
        return found

    # Removing items.
    def _removal_keys(self, digest: str) -> list[str]:
        """What an item's removal reads: watched, so a change to any of them retries it."""
        return [self.key(part, digest) for part in ("item", "children", "tags_of")]

    async def _read_removal(self, pipe: Pipeline,
                            digest: str) -> tuple[Item | None, list[str], list[str]]:
        return (self._item(digest, await pipe.hgetall(self.key("item", digest))),
                sorted(text(c) for c in await pipe.smembers(self.key("children", digest))),
                sorted(text(t) for t in await pipe.smembers(self.key("tags_of", digest))))

    def _remove(self, pipe: Pipeline, digest: str, item: Item | None, children: list[str],
                tags: list[str]) -> None:
        """Queue an item's removal with its references, tag records and manifest (as
        ledger.py's _remove_item); the last result is the total."""
        pipe.delete(*(self.key(part, digest) for part in
                      ("item", "children", "tags_of", "manifest")))
        pipe.zrem(self.key("atime"), digest)
        pipe.srem(self.key("pinned"), digest)
        pipe.srem(self.key("manifests"), digest)
        for child in children:
            pipe.srem(self.key("parents", child), digest)
        for tag in tags:
            pipe.delete(self.key("tag", tag))
        if tags:
            pipe.srem(self.key("tags"), *tags)
        pipe.decrby(self.key("total"), item.size if item is not None else 0)

    @guarded
    async def forget(self, digest: str) -> None:
        async def decide(pipe: Pipeline) -> None:
            item, children, tags = await self._read_removal(pipe, digest)
            pipe.multi()
            self._remove(pipe, digest, item, children, tags)
        _, results = await self._atomic(self._removal_keys(digest), decide)
        self._total = int(results[-1])
        self._clock.pop(digest, None)

    @guarded
    async def evict(self, digest: str, cutoff: float, in_use: Callable[[str], bool],
                    remove_file: Callable[[str], Any],
                    linked_before: float = 0.0) -> Evicted | None:
        links = self.key("links", digest)
        claimed = False  # whether this call marked it `_removing` (a second evict may run)

        async def decide(pipe: Pipeline) -> Evicted | None:
            nonlocal claimed
            item, children, tags = await self._read_removal(pipe, digest)
            if item is None or item.pinned or item.atime >= cutoff:
                return None
            linked = {text(n): float(t) for n, t in (await pipe.hgetall(links)).items()}
            if (await pipe.scard(self.key("parents", digest))
                    or await pipe.scard(self.key("hosted_in", digest))
                    or any(at >= linked_before for at in linked.values())):
                return None
            # Last, just before EXEC: a local read starting later is not a watched key.
            if in_use(digest):
                return None
            pipe.multi()
            if item.kind == "blob":
                # Links older than the grace that nothing refers to go with it.
                for name in linked:
                    pipe.hdel(self.key("hosted", name, "blobs"), digest)
                pipe.delete(links)
            self._remove(pipe, digest, item, children, tags)
            # Marked before EXEC: once it runs, a mount here must not find the file.
            claimed = claimed or digest not in self._removing
            self._removing.add(digest)
            return Evicted(item, children, [split_tag_id(t) for t in tags])

        watched = [*self._removal_keys(digest), self.key("parents", digest), links,
                   self.key("hosted_in", digest)]
        try:
            evicted, results = await self._atomic(watched, decide)
        except WatchError:  # other writers kept changing it: it stays, this pass
            evicted = None
        if evicted is None:
            if claimed:
                self._removing.discard(digest)
            return None
        self._total = int(results[-1])
        self._clock.pop(digest, None)
        try:
            if evicted.item.kind == "blob":
                # After EXEC, not inside it as SQLite does: a transaction cannot wait for a
                # file (or an S3 object) to go. The other order would leave a ledger entry
                # whose file is gone, which serves a 404 as a hit; this one, if the delete
                # fails, leaves a file no entry knows, which `mirror gc` reclaims. Until it
                # is gone, `_removing` keeps a mount on this replica from linking it.
                removed = remove_file(digest)
                if inspect.isawaitable(removed):
                    await removed
        finally:
            if claimed:
                self._removing.discard(digest)
        return evicted

    def total(self) -> int:
        return self._total

    @guarded
    async def refresh_total(self) -> int:
        self._total = int(await self.client.get(self.key("total")) or 0)
        return self._total

