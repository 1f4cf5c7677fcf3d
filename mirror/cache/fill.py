"""One upstream fetch per digest, spooled to disk and read by every waiting client as it grows.

A `Fill` downloads one blob in its own task: each chunk is written to a spool file and
hashed, and `written` grows. Any number of readers — the client that started the fill and
every client that comes later — read the spool file from their own offset with their own
file descriptor, waiting only for bytes that do not exist yet; so time to first byte stays
close to the upstream's and the upstream is read once. The blob is committed (fsync, then
atomic rename into the BlobStore) only when its size and digest check out, and the last
byte of the blob reaches readers only after the digest checked out.

A reader leaving never stops the fill. When the fill fails (upstream cut, wrong digest,
stall), every reader raises `FillFailed` after the bytes it has sent, so a response whose
Content-Length was promised ends short and no client takes it for a whole blob.

Two failures are survivable:
- A body that broke off (cut, stall) leaves a `Partial`: the spool and the hash state so
  far. The next fill of that digest starts from it and asks the upstream for the rest
  with `Range: bytes=N-`; its readers get the first N bytes at once.
- A spool write that fails (disk full) does not fail the clients: the rest of the blob is
  kept in memory (up to OVERFLOW_LIMIT) for the readers, and nothing is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

from .. import metrics
from ..errors import BodyBroken, RegistryError, Unavailable
from ..storage.blobs import BlobStore, pwrite_all

log = logging.getLogger("mirror")

READ_CHUNK = 1 << 20
# With the disk full, at most this much of one blob waits in memory for its readers.
OVERFLOW_LIMIT = 256 << 20
# Broken-off downloads kept for resuming; the oldest spool goes when there are more.
MAX_PARTIALS = 32


class Body(Protocol):
    start: int  # the offset of the first byte the upstream sends (a Range may be ignored)
    size: int | None  # the whole blob's size, when the upstream said

    def chunks(self) -> AsyncIterator[bytes]: ...


Opener = Callable[[int], AbstractAsyncContextManager[Body]]


class FillFailed(Exception):
    """The fill a reader was following did not complete; its response must end short."""


@dataclass
class Partial:
    spool: Path
    written: int
    hasher: Any  # hashlib object over the first `written` bytes


class Fill:
    def __init__(self, digest: str, store: BlobStore, open_body: Opener,
                 partial: Partial | None = None):
        self.digest = digest
        self.store = store
        self.size: int | None = None
        self.done = False
        self.verified = False
        self.committed = False
        self.error: RegistryError | None = None
        self.partial: Partial | None = None  # set when this fill broke off and can resume
        self.readers = 0  # responses reading it now (routes.blob counts them)
        self._open_body = open_body
        if partial is None:
            self._fd, self.spool = store.spool()
            self.written = 0
            self._hasher = hashlib.new(digest.partition(":")[0])
        else:
            self.spool, self.written, self._hasher = partial.spool, partial.written, partial.hasher
            self._fd = os.open(self.spool, os.O_WRONLY)
        self.on_disk = self.written  # bytes in the spool; the rest overflowed to memory
        self._overflow = bytearray()
        self._started = asyncio.get_running_loop().create_future()
        self._began = time.monotonic()
        self._progress = asyncio.Event()

    def open_reader(self) -> int:
        """A descriptor of the spool for one reader; called synchronously while registered."""
        return os.open(self.spool, os.O_RDONLY)

    async def started(self) -> None:
        """Wait until the upstream answered with headers; raise its error if it did not."""
        await asyncio.shield(self._started)

    async def run(self) -> None:
        try:
            await self._download()
        except BodyBroken as e:
            if self.on_disk == self.written and self.written > 0:
                self.partial = Partial(self.spool, self.written, self._hasher)
            self._fail(e)
        except RegistryError as e:
            self._fail(e)
        except Exception as e:  # a bug must not hang the readers
            log.exception("fill of %s failed", self.digest)
            self._fail(Unavailable(f"fetching {self.digest} failed: {e}"))
        finally:
            os.close(self._fd)
            if not self.committed:
                if self.error is None:  # cancelled: the service is stopping
                    self._fail(Unavailable(f"fetching {self.digest} was cancelled"))
                if self.partial is None:
                    self.spool.unlink(missing_ok=True)
            self.done = True
            self._wake()

    async def _download(self) -> None:
        loop = asyncio.get_running_loop()
        resume_at = self.written
        async with self._open_body(resume_at) as body:
            self.size = body.size
            self._started.set_result(None)
            if self.size is not None:
                self._preallocate(self.size)
            if resume_at:
                log.info("resuming %s at byte %d (upstream %s)", self.digest, resume_at,
                         "honoured the Range" if body.start == resume_at else "sent it all")
            skip = resume_at - body.start  # bytes we have, sent again by an upstream without Range
            # Each chunk is written and hashed on a thread (both release the GIL) while the
            # next one is read from the network: the second core does the disk and sha256
            # work, and the event loop stays free for the readers.
            storing = None
            try:
                async for chunk in body.chunks():
                    if skip > 0:
                        chunk, skip = chunk[skip:], skip - min(skip, len(chunk))
                        if not chunk:
                            continue
                    if storing is not None:
                        self._advance(*await storing)
                    storing = loop.run_in_executor(None, self._store, chunk)
            finally:
                # Also on failure: the hash state must cover exactly `written` bytes.
                if storing is not None:
                    self._advance(*await storing)
        if self.size is not None and self.written != self.size:
            raise BodyBroken(f"upstream sent {self.written} of {self.size} bytes of {self.digest}")
        if f"{self.digest.partition(':')[0]}:{self._hasher.hexdigest()}" != self.digest:
            raise Unavailable(f"upstream sent bytes that do not match {self.digest}; not stored")
        self.size = self.written
        self.verified = True
        self._wake()
        if self.on_disk != self.written:
            log.warning("%s was served from memory; not stored, the disk is full", self.digest)
            return
        await loop.run_in_executor(None, os.fsync, self._fd)
        self.store.commit(self.spool, self.digest)
        self.committed = True
        seconds = time.monotonic() - self._began
        metrics.FILL_SECONDS.observe(seconds)
        log.info("stored %s: %d bytes in %.2fs (%.0f MiB/s)", self.digest, self.written,
                 seconds, self.written / seconds / (1 << 20) if seconds else 0)

    def _preallocate(self, size: int) -> None:
        """Reserve the blob's blocks up front: on ext4 that makes the spool writes several
        times faster, and a full disk shows here, before any byte is promised."""
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as e:
            log.warning("cannot reserve %d bytes for %s: %s", size, self.digest, e.strerror)

    def _store(self, chunk: bytes) -> tuple[bytes, bool]:
        """On a worker thread: write a chunk to the spool and hash it; whether it was stored.

        Runs while the event loop waits for it, one chunk at a time, so `on_disk` and
        `written` do not change under it.
        """
        stored = False
        if self.on_disk == self.written:  # still spooling to disk
            try:
                pwrite_all(self._fd, chunk, self.on_disk)
                stored = True
            except OSError as e:
                # Disk full (or failing): the readers still get their bytes, from memory.
                log.error("cannot spool %s at byte %d: %s; keeping the rest in memory and "
                          "storing nothing", self.digest, self.on_disk, e.strerror)
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self.on_disk)  # no half-written chunk on disk
        self._hasher.update(chunk)
        return chunk, stored

    def _advance(self, chunk: bytes, stored: bool) -> None:
        """On the event loop: count a stored chunk (or keep it in memory) and wake readers."""
        if stored:
            self.on_disk += len(chunk)
        else:
            if len(self._overflow) + len(chunk) > OVERFLOW_LIMIT:
                raise Unavailable(f"no disk space to spool {self.digest}")
            self._overflow += chunk
        self.written += len(chunk)
        self._wake()

    def _fail(self, error: RegistryError) -> None:
        self.error = error
        metrics.FILLS_FAILED.inc()
        if not self._started.done():
            self._started.set_exception(error)
            self._started.exception()  # nobody may be waiting; do not warn about it
        log.warning("fill of %s failed: %s", self.digest, error.message)

    def _wake(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def readable(self, offset: int, end: int | None) -> int:
        """Wait until bytes past `offset` exist; return where the readable bytes end (at
        most `end`), or `offset` itself when the blob is complete up to there.

        The blob's last byte is held back until the digest checked out: a client never
        receives a complete body of bytes that turn out to be wrong. Raises FillFailed
        when the fill ended before `end` (or before the blob's end).
        """
        while True:
            limit = self.written if self.verified else max(self.written - 1, 0)
            if end is not None:
                limit = min(limit, end)
            if offset < limit:
                return limit
            if end is not None and offset >= end:
                return offset
            if self.done or self.verified:
                if self.error is not None:
                    raise FillFailed(self.error.message)
                if end is not None:
                    raise FillFailed(f"{self.digest} ended at {offset} of {end} bytes")
                return offset
            await self._progress.wait()

    def overflow(self, offset: int, count: int) -> bytes:
        """Bytes past the spool's end, kept in memory because the disk was full."""
        at = offset - self.on_disk
        return bytes(self._overflow[at:at + min(count, READ_CHUNK)])


class Fills:
    """The fills in flight, one per digest, and the broken-off ones waiting to resume."""

    def __init__(self, store: BlobStore):
        self.store = store
        self.active: dict[str, Fill] = {}
        self.partials: dict[str, Partial] = {}
        self._tasks: set[asyncio.Task] = set()

    def join(self, digest: str, open_body: Opener) -> tuple[Fill, int]:
        """The fill of `digest` (started if none runs) and a spool descriptor to read it.

        Synchronous on purpose: between finding a fill here and opening its spool there is
        no await, so the fill cannot commit (rename the spool away) in between.
        """
        fill = self.active.get(digest)
        if fill is None:
            fill = Fill(digest, self.store, open_body, self.partials.pop(digest, None))
            self.active[digest] = fill
            task = asyncio.ensure_future(self._run(fill))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fill, fill.open_reader()

    async def _run(self, fill: Fill) -> None:
        try:
            await fill.run()
        finally:
            del self.active[fill.digest]
            if fill.partial is not None:
                self._keep(fill.digest, fill.partial)

    def _keep(self, digest: str, partial: Partial) -> None:
        self.partials[digest] = partial
        while len(self.partials) > MAX_PARTIALS:
            oldest = next(iter(self.partials))
            self.partials.pop(oldest).spool.unlink(missing_ok=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
