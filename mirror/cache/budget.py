"""Budget: keeps cached content under `storage.max_size`, least recently used first.

Every few seconds the clocks of recent hits are written to the ledger in one batch; when
what the storage root holds (the ledger's total, broken-off downloads kept for resuming,
uploads in progress) is above the high watermark, items are evicted, oldest first, until
it is below the low watermark. Broken-off downloads go first: they are only a head start.

Each item is one decision, taken in the metadata store's own transaction at the moment of
deletion (`Metadata.evict`), not from a snapshot of the pass: an item stays when, *then*,

- a kept manifest refers to it (a shared base layer goes only when every image using it
  has gone; a pinned image's content is referred to by the pinned manifest), a hosted
  repository's manifest is it, it is pinned, or it was linked into a hosted repository
  (an upload, a mount) less than `hosted.upload_ttl` ago — a push uploads its blobs
  before the manifest that will refer to them;
- it was used in the last `storage.keep_recent` seconds, or a response found it stored
  and is sending it (`hold`), or a fill of it is in flight.

With several replicas (S3 + Redis) the ledger and its total are the cluster's, every
replica flushes its clocks into it, and one replica at a time evicts: the one holding the
`evict` lease (cluster/lease.py), which it renews page by page. A blob another replica is
sending (its heartbeat lists it, cluster/replicas.py) counts as in use.

A manifest goes with every tag record that points to it, so no tag ever points to
something deleted; its blobs become free to go in their own turn. A pass reads the
ledger's oldest rows a page at a time through an index: its work grows with what it
evicts, not with the size of the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Callable

from .. import config as cfg
from ..metrics import Metrics
from ..storage.blobs import BlobStore
from ..storage.index import Index

if TYPE_CHECKING:
    from ..cluster.lease import Lease
    from ..cluster.replicas import Replicas

log = logging.getLogger("mirror")

CHECK_SECONDS = 5.0


class Budget:
    def __init__(self, config: cfg.Storage, index: Index, store: BlobStore,
                 in_flight: Callable[[str], bool] = lambda digest: False,
                 extra: Callable[[], int] = lambda: 0,
                 release: Callable[[int], int] = lambda needed: 0,
                 link_grace: float = 86400.0, lease: Lease | None = None,
                 replicas: Replicas | None = None, metrics: Metrics | None = None):
        self.max_size = config.max_size
        self.high = config.high_watermark
        self.low = config.low_watermark
        self.keep_recent = config.keep_recent
        self.link_grace = link_grace  # hosted.upload_ttl: a push's blobs wait for its manifest
        self.metadata = index.metadata
        self.index = index
        self.store = store
        self._in_flight = in_flight   # a fill of this digest is running
        self._extra = extra           # bytes on disk the ledger does not count
        self._release = release       # free that many bytes of resumable spools
        self.readers: Counter[str] = Counter()
        self.lease = lease          # with a cluster: only its holder evicts
        self.replicas = replicas    # with a cluster: what the other replicas are sending
        self._held_elsewhere: set[str] = set()
        self._extra_bytes = 0  # `extra()` as of the last check: it walks the uploads folder
        self.evicted_items = 0
        self.evicted_bytes = 0
        # Counted where nobody reads when none is given (a budget built alone, in a test).
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.set_disk(lambda: self.used, lambda: self.max_size)

    @property
    def used(self) -> int:
        """Bytes held: the ledger's running total, and what it does not count (resumable
        spools, uploads in progress) as of the last check."""
        return self.metadata.total() + self._extra_bytes

    def hold(self, digest: str) -> "Hold":
        """Hold `digest` against eviction from now until `release()`: from the moment a
        request finds the blob stored to the moment its last byte is out."""
        self.readers[digest] += 1
        return Hold(self.readers, digest)

    def _in_use(self, digest: str) -> bool:
        # Called on the metadata thread: reads only, of a dict the loop thread updates.
        return self.readers.get(digest, 0) > 0 or self._in_flight(digest) or \
            digest in self._held_elsewhere

    def held(self, digest: str) -> bool:
        """Whether a response here is sending `digest` (the local tier keeps it meanwhile)."""
        return self.readers.get(digest, 0) > 0

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                await self.check()
            except Exception:  # housekeeping must outlive a bad pass; the next one retries
                log.exception("the eviction pass failed")

    async def check(self) -> tuple[int, int]:
        """Write the clocks; evict when above the high watermark. (items, bytes) evicted."""
        await self.metadata.flush()
        await self.metadata.refresh_total()
        if self.store.tier is not None:
            # Copies skipped at admission because a response was sending them go now.
            self.store.tier.trim()
        # A walk of uploads/ (a stat per upload): on a thread, not the event loop.
        self._extra_bytes = await asyncio.get_running_loop().run_in_executor(None, self._extra)
        if self.max_size is None or self.used <= self.max_size * self.high:
            return 0, 0
        if self.lease is None:
            return await self.evict(int(self.max_size * self.low))
        if not await self.lease.acquire():
            return 0, 0  # another replica is evicting
        try:
            return await self.evict(int(self.max_size * self.low))
        finally:
            self._held_elsewhere = set()
            await self.lease.release()

    async def evict(self, target: int) -> tuple[int, int]:
        """Evict least recently used items until at most `target` bytes are held."""
        before, started = self.used, time.monotonic()
        if self.used > target:
            freed_spools = self._release(self.used - target)
            self._extra_bytes = max(self._extra_bytes - freed_spools, 0)
            if freed_spools:
                log.info("freed %d bytes of broken-off downloads kept for resuming",
                         freed_spools)
        cutoff = time.time() - self.keep_recent
        items = freed = 0
        position = (0.0, "")
        while self.used > target:
            if self.lease is not None:
                if not await self.lease.renew():
                    log.warning("lost the eviction lease mid-pass; another replica goes on")
                    break
                self._held_elsewhere = await self.replicas.held_elsewhere() \
                    if self.replicas is not None else set()
            page = await self.metadata.oldest(cutoff, position)
            if not page:
                break
            for item in page:
                position = (item.atime, item.digest)
                if self.used <= target:
                    break
                n, size = await self._evict(item.digest, cutoff)
                items, freed = items + n, freed + size
        self.evicted_items += items
        self.evicted_bytes += freed
        self.metrics.evictions.inc(items)
        self.metrics.evicted_bytes.inc(freed)
        if items:
            log.info("evicted %d items, %d bytes in %.2fs: %d -> %d bytes (budget %d)", items,
                     freed, time.monotonic() - started, before, self.used, self.max_size or 0)
        if self.used > target:
            log.warning("cannot get under %d bytes: %d bytes are hosted, pinned, in use or "
                        "referred to", target, self.used)
        return items, freed

    async def _evict(self, digest: str, cutoff: float) -> tuple[int, int]:
        """Evict one item and then whatever it alone kept (an image's layers, an index's
        manifests) that may go now; (items, bytes) freed."""
        evicted = await self.metadata.evict(digest, cutoff, self._in_use, self.store.remove,
                                            linked_before=time.time() - self.link_grace)
        if evicted is None:
            return 0, 0
        if evicted.item.kind == "manifest":
            await self.index.forget_cached(digest, evicted.tags)
        items, freed = 1, evicted.item.size
        for child in evicted.children:
            n, size = await self._evict(child, cutoff)
            items, freed = items + n, freed + size
        return items, freed


class Hold:
    """One response's claim on a blob; `release` is idempotent (a response that is never
    sent releases it when it is collected, see api/responses.py)."""

    def __init__(self, readers: Counter[str], digest: str):
        self._readers = readers
        self.digest = digest
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._readers[self.digest] -= 1
            if self._readers[self.digest] <= 0:
                del self._readers[self.digest]
