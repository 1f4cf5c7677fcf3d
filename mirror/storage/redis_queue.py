"""WriteQueue: ledger writes made without waiting (a blob commit's `record_blob`), written
to Redis in order by one background task, and kept through an outage.

A commit must not wait on Redis, and must not fail because Redis is down; but a read made
after it on the same replica must see it, as SQLite's single thread guarantees. So entries
are numbered as they are queued, one task writes them a batch at a time, and `settle()`
waits until everything queued before the call is written, or the writer stopped at a
failure. What a failure leaves stays queued (up to MAX_PENDING, then the oldest go, logged
once) and is written by the next `retry()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

log = logging.getLogger("mirror")

MAX_PENDING = 100_000  # entries held through an outage; past it the oldest are dropped
BATCH = 500  # entries per transaction


class WriteQueue:
    def __init__(self, write: Callable[[list[Any]], Awaitable[None]],
                 failed: Callable[[RedisError], Any], where: str):
        self._write = write  # writes one batch in one transaction
        self._failed = failed  # logs an outage once
        self._where = where
        self._pending: deque[tuple[int, Any]] = deque()  # (sequence number, entry)
        self._queued = self._written = 0  # sequence numbers: last queued, last written
        self._dropped = 0  # entries dropped since the last successful write
        self._error: RedisError | None = None  # why the writer last stopped
        self._writer: asyncio.Task | None = None
        self._progress = asyncio.Event()  # set, and replaced, whenever the writer advances
        self._closed = False

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, entry: Any) -> None:
        """Queue `entry` and start the writer; called on the event loop's thread."""
        self._queued += 1
        self._pending.append((self._queued, entry))
        if len(self._pending) > MAX_PENDING:
            self._pending.popleft()
            self._dropped += 1
            if self._dropped == 1:
                log.error("more than %d ledger writes are waiting for Redis at %s: dropping "
                          "the oldest (`mirror gc` enters their blobs again)", MAX_PENDING,
                          self._where)
        self._start()

    def _start(self) -> None:
        if not self._closed and not self._running():
            try:
                self._writer = asyncio.get_running_loop().create_task(self._drain())
            except RuntimeError:  # no event loop (a command ending): the next retry writes it
                pass

    def _running(self) -> bool:
        return self._writer is not None and not self._writer.done()

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = list(itertools.islice(self._pending, BATCH))
                await self._write([entry for _, entry in batch])
                self._written = batch[-1][0]
                # Not popleft(len(batch)): put() may have dropped some meanwhile.
                while self._pending and self._pending[0][0] <= self._written:
                    self._pending.popleft()
                self._dropped = 0
                self._wake()
        except RedisError as e:
            self._error = e
            self._failed(e)
        except Exception:
            log.exception("writing the queued ledger entries to Redis at %s failed",
                          self._where)
        finally:
            self._wake()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def settle(self) -> None:
        """Wait until what was queued before this call is written, or the writer stopped."""
        target = self._queued
        while self._written < target and self._running():
            await self._progress.wait()

    async def retry(self) -> None:
        """Write what an outage left queued; raise the writer's error if it fails again."""
        if self._pending:
            self._start()
            await self.settle()
            if self._pending and not self._running():
                raise self._error or RedisError("the queued ledger writes were not written")

    async def close(self) -> None:
        self._closed = True
        if self._running():
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
