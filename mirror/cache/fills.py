"""Fills: the fills in flight, one per digest, and the broken-off ones kept for resuming.

`join` finds the running fill of a digest or starts one (fill.py); a fill that broke off
leaves a `Partial`, kept here (at most MAX_PARTIALS, oldest dropped first) for the next
fill of that digest to resume from. The budget counts their bytes (`partial_bytes`) and
gives them up first under pressure (`release_partials`). The memory a full disk makes the
fills hold is one `Overflow` shared by all of them.
"""

from __future__ import annotations

import asyncio
import logging

from ..metrics import Metrics
from ..storage.blobs import BlobStore
from . import fill as fill_module
from .fill import Fill, Opener, Overflow, Partial

log = logging.getLogger("mirror")

# Broken-off downloads kept for resuming; the oldest spool goes when there are more.
MAX_PARTIALS = 32


class Fills:
    """The fills in flight, one per digest, and the broken-off ones waiting to resume."""

    def __init__(self, store: BlobStore, overflow_limit: int | None = None,
                 metrics: Metrics | None = None):
        self.store = store
        # The application's, handed to each fill; one of its own when built alone (tests).
        self.metrics = metrics if metrics is not None else Metrics()
        self.active: dict[str, Fill] = {}
        self.partials: dict[str, Partial] = {}  # oldest first
        # Read at construction from fill.py, where the bound is defined (and tests set it).
        limit = fill_module.OVERFLOW_LIMIT if overflow_limit is None else overflow_limit
        self.overflow = Overflow(limit)
        self._tasks: set[asyncio.Task] = set()

    def join(self, digest: str, open_body: Opener, route: str = "") -> tuple[Fill, int]:
        """The fill of `digest` (started if none runs) and a spool descriptor to read it;
        `open_body` is this joiner's route to the blob, used if the routes before it fail.

        Synchronous on purpose: between finding a fill here and opening its spool there is
        no await, so the fill cannot end (and remove a failed spool) in between; a commit
        renaming it on a thread meanwhile is handled by `open_reader`.
        """
        fill = self.active.get(digest)
        if fill is None:
            fill = Fill(digest, self.store, open_body, self.partials.pop(digest, None),
                        route=route, overflow=self.overflow, metrics=self.metrics)
            self.active[digest] = fill
            task = asyncio.ensure_future(self._run(fill))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            fill.add_source(route, open_body)
        return fill, fill.open_reader()

    async def _run(self, fill: Fill) -> None:
        try:
            await fill.run()
        finally:
            del self.active[fill.digest]
            if fill.partial is not None:
                self._keep(fill.digest, fill.partial)
            for done in fill.on_done:  # a cluster lease on the digest, released
                try:
                    await done()
                except Exception:  # one failed release must not keep the others
                    log.exception("cleaning up after the fill of %s failed", fill.digest)

    def reader(self, digest: str) -> tuple[Fill, int] | None:
        """A descriptor of a running fill's spool, joining as a reader only (no source):
        for a replica streaming this fill from us."""
        fill = self.active.get(digest)
        return (fill, fill.open_reader()) if fill is not None else None

    def _keep(self, digest: str, partial: Partial) -> None:
        self.partials[digest] = partial
        while len(self.partials) > MAX_PARTIALS:
            oldest = next(iter(self.partials))
            self.partials.pop(oldest).spool.unlink(missing_ok=True)

    def partial_bytes(self) -> int:
        """Bytes the broken-off downloads kept for resuming hold on disk."""
        # list() copies in one step under the GIL: the budget calls this from a thread.
        return sum(partial.written for partial in list(self.partials.values()))

    def release_partials(self, bytes_needed: int) -> int:
        """Give up kept partial downloads, oldest first, until `bytes_needed` bytes are
        freed (or none is left); the bytes freed. Their next fill starts from byte 0."""
        freed = 0
        while freed < bytes_needed and self.partials:
            digest = next(iter(self.partials))
            partial = self.partials.pop(digest)
            partial.spool.unlink(missing_ok=True)
            freed += partial.written
            log.info("gave up the partial download of %s (%d bytes) to free space", digest,
                     partial.written)
        return freed

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
