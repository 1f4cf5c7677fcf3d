"""Budget: keeps cached content under `storage.max_size`, least recently used first.

Every few seconds the clocks of recent hits are written to the ledger (usage.py) in one
batch; when the ledger's total is above the high watermark, items are evicted, oldest
first, until it is below the low watermark. The rules, so that nothing is served broken:

- a blob is deleted only when no kept manifest refers to it: a shared base layer goes
  only when every image using it has gone;
- a manifest goes with every tag record that points to it, so no tag or manifest ever
  points to something deleted (its blobs become free to go in their own turn);
- never evicted: what a hosted repository holds, pinned images and all they refer to,
  a blob still being filled (it is not in the ledger until committed), and anything used
  in the last `storage.keep_recent` seconds (a blob a client is about to open).

An eviction pass reads the ledger's oldest rows through an index: its work grows with
what it evicts, not with the size of the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .. import config as cfg
from .. import metrics
from ..storage.blobs import BlobStore
from ..storage.index import Index
from ..storage.usage import Usage
from .hosted import Hosted

log = logging.getLogger("mirror")

CHECK_SECONDS = 5.0


class Budget:
    def __init__(self, config: cfg.Storage, usage: Usage, store: BlobStore, index: Index,
                 hosted: Hosted):
        self.max_size = config.max_size
        self.high = config.high_watermark
        self.low = config.low_watermark
        self.keep_recent = config.keep_recent
        self.usage = usage
        self.store = store
        self.index = index
        self.hosted = hosted
        self.evicted_items = 0
        self.evicted_bytes = 0
        metrics.set_disk(lambda: self.used, lambda: self.max_size)

    @property
    def used(self) -> int:
        return self.usage.total()

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(CHECK_SECONDS)
            try:
                await self.check()
            except Exception:  # housekeeping must outlive a bad pass; the next one retries
                log.exception("the eviction pass failed")

    async def check(self) -> tuple[int, int]:
        """Write the clocks; evict when above the high watermark. (items, bytes) evicted."""
        self.usage.flush()
        if self.max_size is None or self.used <= self.max_size * self.high:
            return 0, 0
        return await self.evict(int(self.max_size * self.low))

    async def evict(self, target: int) -> tuple[int, int]:
        """Evict least recently used items until the ledger holds at most `target` bytes."""
        before, started = self.used, time.monotonic()
        protected = self.hosted.held | self.usage.pinned_closure()
        cutoff = time.time() - self.keep_recent
        items = freed = 0
        for item in self.usage.oldest(cutoff):
            if self.used <= target:
                break
            if item.digest in protected or self.usage.parents(item.digest):
                continue  # kept, or still referred to by a kept manifest
            n, size = await self._evict(item.digest, item.kind, protected, cutoff)
            items, freed = items + n, freed + size
            # Yield now and then: a long pass must not stall the requests being served.
            await asyncio.sleep(0)
        self.evicted_items += items
        self.evicted_bytes += freed
        metrics.EVICTIONS.inc(items)
        metrics.EVICTED_BYTES.inc(freed)
        if items:
            log.info("evicted %d items, %d bytes in %.2fs: %d -> %d bytes (budget %d)", items,
                     freed, time.monotonic() - started, before, self.used, self.max_size or 0)
        if self.used > target:
            log.warning("cannot get under %d bytes: %d bytes are hosted, pinned, in use or "
                        "referred to", target, self.used)
        return items, freed

    async def _evict(self, digest: str, kind: str, protected: set[str],
                     cutoff: float) -> tuple[int, int]:
        """Evict one item and then whatever it alone kept (an image's layers, an index's
        manifests) that is not protected or recently used; (items, bytes) freed."""
        item = self.usage.item(digest)
        if item is None:
            return 0, 0
        children = self.usage.children(digest) if kind == "manifest" else []
        if kind == "manifest":
            await self.index.drop_manifest(digest)
        else:
            self.store.remove(digest)
        items, freed = 1, item.size
        for child in children:
            found = self.usage.item(child)
            if found is None or child in protected or found.atime >= cutoff \
                    or self.usage.parents(child):
                continue
            n, size = await self._evict(child, found.kind, protected, cutoff)
            items, freed = items + n, freed + size
        return items, freed
