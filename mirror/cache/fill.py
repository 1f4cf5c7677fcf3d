"""One upstream fetch per digest, spooled to disk and read by every waiting client as it grows.

A `Fill` downloads one blob in its own task (fills.py keeps them, one per digest): each
chunk is written to a spool file and hashed, and `written` grows. Any number of readers —
the client that started the fill and every client that comes later — read the spool file
from their own offset with their own file descriptor, waiting only for bytes that do not
exist yet; so time to first byte stays close to the upstream's and the upstream is read
once. An upstream's plain-HTTP body framed by Content-Length is read on the fill's own
thread, socket to spool and hash without the GIL (`_pump`, upstream/raw_body.py); TLS,
chunked, peer and object-store bodies are read by aiohttp on the loop with the write and
hash on a worker thread (`_read_chunks`). The blob is committed (fsync, then atomic rename
into the BlobStore) only when its size and digest check out, and the last byte of the blob
reaches readers only after the digest checked out.

A fill is shared by digest, but every client that joins it brings its own route (the
upstream and repository it asked through) as a `Source`. The fill reads from the first
source; when that route fails — the upstream answers 404, 401/403 or 429, is down, or its
body breaks off — the fill goes on from the next joiner's source, asking it with
`Range: bytes=N-` for the bytes it does not have yet. So a bogus repository name or a down
`?ns=` upstream fails nobody whose own route works: every reader gets the bytes if any
route delivers them (they are the same bytes, checked against the digest, and a committed
blob is served to every name anyway). Only when every joiner's route failed does the fill
fail, with the first route's error.

A reader leaving never stops the fill. When the fill fails (every route failed, wrong
digest, a stall with no other route), every reader raises `FillFailed` after the bytes it
has sent, so a response whose Content-Length was promised ends short and no client takes
it for a whole blob. An upstream that says "not here" (404, denied) is an answer, not a
failed fill: it is logged at DEBUG and not counted in mirror_fills_failed_total.

Two failures are survivable:
- A body that broke off (cut, stall) leaves a `Partial`: the spool, truncated to the bytes
  written, and the hash state so far. The next fill of that digest starts from it and asks
  the upstream for the rest with `Range: bytes=N-`; its readers get the first N bytes at
  once. Partials count towards the disk budget (`Fills.partial_bytes`) and are the first
  thing given up under pressure (`Fills.release_partials`).
- A spool write that fails (disk full) does not fail the clients: the rest of the blob is
  kept in memory for the readers, and nothing is committed. That memory is bounded over all
  fills together (`Overflow`, OVERFLOW_LIMIT), not per fill; a fill that would pass it fails,
  and so does one that nobody reads any more (nothing of it could be stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import (
    BlobUnknown,
    BodyBroken,
    Denied,
    NameUnknown,
    RegistryError,
    StorageError,
    StorageFull,
    TooManyRequests,
    Unavailable,
)
from ..metrics import Metrics
from ..storage.blobs import BlobStore, pwrite_all
from ..upstream.raw_body import RawBody
from .hashing import BackgroundHash

log = logging.getLogger("mirror")

READ_CHUNK = 1 << 20
# What the pump thread reads, writes and hashes at a time, and so how often the loop wakes:
# one call per MiB is ~500 wake-ups for a 512 MiB layer, and 1 MiB of lag for the readers.
PUMP_CHUNK = 1 << 20
# At most this many fills read on threads at once, the rest on the loop: 32 pump threads
# (and their hash threads) starved the event loop of CPU and GIL, and manifest GETs fell
# from ~105 to 6-9 req/s while 32 cold layers streamed (bench/mixed.py, issue 13).
PUMP_LIMIT = max(2, os.cpu_count() or 2)
# Chunks the hash thread may lag behind the pump (each a PUMP_CHUNK buffer of the fill's).
HASH_DEPTH = 4
# With the disk full, at most this much of all blobs being filled waits in memory for
# their readers, over every fill at once.
OVERFLOW_LIMIT = 256 << 20
# Failures of one route to a blob (its upstream, or its repository there), not of the blob:
# another joiner's route may still deliver the same bytes.
ROUTE_ERRORS = (BlobUnknown, NameUnknown, Denied, TooManyRequests, Unavailable)
# The upstream's answer that the blob is not there for this name: not a failed fill.
ANSWERS = (BlobUnknown, NameUnknown, Denied)


class Body(Protocol):
    start: int  # the offset of the first byte the upstream sends (a Range may be ignored)
    size: int | None  # the whole blob's size, when the upstream said

    def chunks(self) -> AsyncIterator[bytes]: ...


Opener = Callable[[int], AbstractAsyncContextManager[Body]]


class FillFailed(Exception):
    """The fill a reader was following did not complete; its response must end short."""


@dataclass
class Source:
    """One joiner's way to the blob: its route's name, and how to open the body there."""

    route: str  # "<upstream>/<repository>", as Route.key
    open_body: Opener
    error: RegistryError | None = None  # why this route failed for this fill


@dataclass
class Partial:
    spool: Path
    written: int  # the spool's length: truncated to this when the fill broke off
    hasher: Any  # hashlib object over the first `written` bytes
    kept_at: float = field(default_factory=time.monotonic)


class Overflow:
    """The memory all fills together may hold for their readers while the disk is full."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0

    def take(self, count: int) -> bool:
        if self.used + count > self.limit:
            return False
        self.used += count
        self.peak = max(self.peak, self.used)
        return True

    def give_back(self, count: int) -> None:
        self.used -= count


class Fill:
    pumping = 0  # fills reading on their own thread now, over the process (PUMP_LIMIT)

    def __init__(self, digest: str, store: BlobStore, open_body: Opener,
                 partial: Partial | None = None, route: str = "",
                 overflow: Overflow | None = None, metrics: Metrics | None = None):
        self.digest = digest
        # Counted where nobody reads when none is given (a fill built alone, in a test).
        self.metrics = metrics if metrics is not None else Metrics()
        self.store = store
        self.size: int | None = None
        self.done = False
        self.verified = False
        self.committed = False
        self.error: RegistryError | None = None
        self.partial: Partial | None = None  # set when this fill broke off and can resume
        self.sources = [Source(route, open_body)]
        # Run by fills.py when the fill ended, committed or not (a cluster lease release).
        self.on_done: list[Callable[[], Any]] = []
        # False for a follower in a cluster: the holder uploads the blob to the bucket, this
        # fill keeps only its local copy (a takeover sets it back: then nobody else will).
        self.upload = True
        self._readers = 0
        self._budget = overflow if overflow is not None else Overflow(OVERFLOW_LIMIT)
        if partial is None:
            self._fd, self.spool = store.spool()
            self.written = 0
            self._hasher = hashlib.new(digest.partition(":")[0])
        else:
            self.spool, self.written, self._hasher = partial.spool, partial.written, partial.hasher
            self._fd = os.open(self.spool, os.O_WRONLY)
        self.on_disk = self.written  # bytes in the spool; the rest overflowed to memory
        self._overflow = bytearray()
        self._preallocated = False
        self._routes_failed = False  # the fill ended because every route failed
        self._started = asyncio.get_running_loop().create_future()
        self._began = time.monotonic()
        self._progress = asyncio.Event()

    @property
    def readers(self) -> int:
        """Responses reading it now (routes.blob counts them)."""
        return self._readers

    @readers.setter
    def readers(self, count: int) -> None:
        self._readers = count
        if count == 0 and self.done:
            self._drop_overflow()

    def add_source(self, route: str, open_body: Opener) -> None:
        """A joiner's route, tried when every route before it failed; once per route."""
        if all(source.route != route for source in self.sources):
            self.sources.append(Source(route, open_body))

    def open_reader(self) -> int:
        """A descriptor of the spool for one reader; called synchronously while registered.

        The commit renames the spool on a worker thread while the fill is still active, so
        a reader joining at that moment finds it gone: the same bytes are at the blob's
        committed path by then (the rename is the only way the spool disappears while the
        fill is active)."""
        try:
            return os.open(self.spool, os.O_RDONLY)
        except FileNotFoundError:
            return os.open(self.store.path(self.digest), os.O_RDONLY)

    async def started(self) -> None:
        """Wait until an upstream answered with headers; raise the error if none did."""
        await asyncio.shield(self._started)

    async def run(self) -> None:
        try:
            await self._download()
        except RegistryError as e:
            if self._routes_failed and self.written and self.on_disk == self.written:
                self._keep_partial()
            self._fail(e)
        except Exception as e:  # a bug must not hang the readers
            log.exception("fill of %s failed", self.digest)
            self._fail(Unavailable(f"fetching {self.digest} failed: {e}"))
        finally:
            os.close(self._fd)
            if not self.committed:
                if self.error is None and not self.verified:  # cancelled: stopping
                    self._fail(Unavailable(f"fetching {self.digest} was cancelled"))
                if self.partial is None:
                    self.spool.unlink(missing_ok=True)
            self.done = True
            if self._readers == 0:
                self._drop_overflow()
            self._wake()

    async def _download(self) -> None:
        while True:
            source = self._next_source()
            if source is None:
                self._routes_failed = True
                raise self.sources[0].error  # type: ignore[misc]  # every route has one
            try:
                await self._stream(source)
                break
            except ROUTE_ERRORS as e:
                source.error = e
                following = self._next_source()
                if following is not None:
                    log.info("fetching %s through %s failed (%s); going on from byte %d "
                             "through %s", self.digest, source.route, e.message, self.written,
                             following.route)
        await self._verify_and_commit()

    def _next_source(self) -> Source | None:
        return next((s for s in self.sources if s.error is None), None)

    async def _stream(self, source: Source) -> None:
        """Read the rest of the blob through one route; raise that route's failure."""
        loop = asyncio.get_running_loop()
        resume_at = self.written
        async with source.open_body(resume_at) as body:
            if not self._started.done():
                self.size = body.size
                self._started.set_result(None)
            elif body.size is not None and self.size is not None and body.size != self.size:
                raise Unavailable(f"{source.route} has {body.size} bytes for {self.digest}, "
                                  f"another route said {self.size}")
            reserving = None
            if self.size is not None and not self._preallocated:
                # On a thread, and awaited only before the first write, not before the first
                # read: a body cut while we waited would lose what aiohttp had buffered (its
                # reads raise a stored error before handing over buffered bytes), and with
                # it the resume point. No write may overlap it: a failed fallocate undoes
                # the blocks it took, and would take a concurrent write's bytes with them.
                self._preallocated = True
                reserving = loop.run_in_executor(None, self._preallocate, self.size)
            if resume_at:
                log.info("resuming %s at byte %d through %s (upstream %s)", self.digest,
                         resume_at, source.route,
                         "honoured the Range" if body.start == resume_at else "sent it all")
            skip = resume_at - body.start  # bytes we have, sent again by an upstream without Range
            detach = getattr(body, "detach", None)  # upstream bodies; not S3's or a peer's
            raw = None
            if detach is not None and skip == 0 and Fill.pumping < PUMP_LIMIT:
                raw = detach()
            if raw is not None:
                Fill.pumping += 1
                try:
                    await self._pump(raw, reserving)
                finally:
                    Fill.pumping -= 1
            else:
                await self._read_chunks(body, skip, reserving)
        if self.size is not None and self.written != self.size:
            raise BodyBroken(f"upstream sent {self.written} of {self.size} bytes of {self.digest}")

    async def _read_chunks(self, body: Body, skip: int, reserving: asyncio.Future | None) -> None:
        """The loop path: aiohttp reads the body; each chunk is written and hashed on a
        thread (both release the GIL) while the next one is read."""
        loop = asyncio.get_running_loop()
        storing = None
        try:
            async for chunk in body.chunks():
                if skip > 0:
                    chunk, skip = chunk[skip:], skip - min(skip, len(chunk))
                    if not chunk:
                        continue
                if storing is not None:
                    self._advance(*await storing)
                if reserving is not None:
                    await reserving
                    reserving = None
                storing = loop.run_in_executor(None, self._store, chunk)
        finally:
            # Also on failure: the hash state must cover exactly `written` bytes.
            if storing is not None:
                self._advance(*await storing)
            if reserving is not None:
                await reserving

    async def _pump(self, raw: RawBody, reserving: asyncio.Future | None) -> None:
        """The thread path (upstream/raw_body.py): one worker thread reads the socket into a
        reused buffer, writes each MiB to the spool and hashes it, all without the GIL, and
        tells the loop with one call per MiB; the loop only counts and wakes the readers.

        The loop keeps `written`, `on_disk` and the overflow as before (`_advance`), in the
        order the thread sent them. Stopping (cancel, or `_advance` refusing: disk full with
        nobody reading) tells the thread, which ends within raw_body.TICK, and waits for
        it: it must not write to a spool descriptor run() is about to close."""
        loop = asyncio.get_running_loop()
        refused: list[RegistryError] = []

        def advance(count: int, kept: bytes | None) -> None:
            if refused:
                return
            try:
                self._advance(count, kept)
            except RegistryError as e:
                refused.append(e)
                raw.stop()

        try:
            if reserving is not None:
                await reserving  # no write may overlap the fallocate (see _stream)
            pumping = _on_own_thread(f"fill {self.digest[:19]}", self._pump_on_thread, raw,
                                     lambda *a: loop.call_soon_threadsafe(advance, *a))
            try:
                await asyncio.shield(pumping)
            except asyncio.CancelledError:
                raw.stop()
                with contextlib.suppress(Exception):
                    await pumping
                raise
            if refused:
                raise refused[0]
        finally:
            raw.close()

    def _pump_on_thread(self, raw: RawBody,
                        advance: Callable[[int, bytes | None], None]) -> None:
        """On the fill's own thread: the body from the socket to the spool, and to the hash
        on a thread of its own (hashing.py), so that hashing one chunk overlaps receiving
        and writing the next.

        `written` and `on_disk` belong to the loop; the thread keeps its own offset and
        whether the disk still takes bytes. A chunk is handed over once written (readers
        read the spool; only the last byte waits for the digest), and the hash thread is
        joined before this returns, so a break leaves the hash over exactly the advanced
        bytes."""
        at, to_disk = self.written, self.on_disk == self.written
        hashing = BackgroundHash(self._hasher, PUMP_CHUNK, HASH_DEPTH,
                                 f"hash {self.digest[:19]}")
        try:
            pending = memoryview(raw.head)
            while not raw.stopping.is_set():
                buffer = None
                if pending:
                    data, pending = pending[:PUMP_CHUNK], pending[PUMP_CHUNK:]
                elif raw.remaining:
                    buffer = hashing.buffer()
                    view = memoryview(buffer)
                    try:
                        data = view[:raw.read_into(view)]
                    except BaseException:
                        hashing.update(view[:0], buffer)  # back to the ring, nothing hashed
                        raise
                else:
                    return
                to_disk = to_disk and self._spool(data, at)
                kept = None if to_disk else bytes(data)
                hashing.update(data, buffer)
                at += len(data)
                if data:  # empty: stopping
                    advance(len(data), kept)
        finally:
            hashing.close()

    async def _verify_and_commit(self) -> None:
        if f"{self.digest.partition(':')[0]}:{self._hasher.hexdigest()}" != self.digest:
            raise Unavailable(f"upstream sent bytes that do not match {self.digest}; not stored")
        self.size = self.written
        self.verified = True
        self._wake()
        if self.on_disk != self.written:
            # The spool failure was logged when it happened: this is only the outcome.
            log.info("%s was served from memory; not stored, the disk is full", self.digest)
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, os.fsync, self._fd)
            await self.store.commit_async(self.spool, self.digest, upload=self.upload)
        except (OSError, StorageError) as e:
            # The readers have every verified byte already; only the copy is lost.
            message = e.message if isinstance(e, StorageError) else f"{e.strerror} ({e.filename})"
            log.warning("%s was served but not stored: %s", self.digest, message)
            return
        self.committed = True
        seconds = time.monotonic() - self._began
        self.metrics.fill_seconds.observe(seconds)
        log.info("stored %s: %d bytes in %.2fs (%.0f MiB/s)", self.digest, self.written,
                 seconds, self.written / seconds / (1 << 20) if seconds else 0)

    def _preallocate(self, size: int) -> None:
        """On a worker thread: reserve the blob's blocks up front. On ext4 that makes the
        spool writes several times faster, and a full disk shows here, before any byte is
        promised."""
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as e:
            log.warning("cannot reserve %d bytes for %s: %s", size, self.digest, e.strerror)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.on_disk)  # give back what a failed call reserved

    def _store(self, chunk: bytes) -> tuple[int, bytes | None]:
        """On a worker thread: write a chunk to the spool and hash it; `_advance`'s arguments.

        Runs while the event loop waits for it, one chunk at a time, so `on_disk` and
        `written` do not change under it.
        """
        stored = self.on_disk == self.written and self._spool(chunk, self.on_disk)
        self._hasher.update(chunk)
        return len(chunk), None if stored else chunk

    def _spool(self, data: bytes | memoryview, at: int) -> bool:
        """On a worker thread: write `data` at `at`; False when the disk refused it. Then
        (disk full, or failing) the readers still get their bytes, from memory."""
        try:
            pwrite_all(self._fd, data, at)
            return True
        except OSError as e:
            log.error("cannot spool %s at byte %d: %s; keeping the rest in memory and "
                      "storing nothing", self.digest, at, e.strerror)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, at)  # no half-written chunk on disk
            return False

    def _advance(self, count: int, kept: bytes | None) -> None:
        """On the event loop: count `count` more bytes, stored in the spool (`kept` None) or
        kept in memory for the readers because the disk is full; wake the readers."""
        if kept is None:
            self.on_disk += count
        else:
            if self._readers == 0:
                raise StorageFull(f"the disk is full and nobody reads {self.digest} any more: "
                                  "stopping its download, nothing of it could be stored")
            if not self._budget.take(count):
                raise StorageFull(
                    f"the disk is full and the fills waiting for it already hold "
                    f"{self._budget.used} bytes in memory (at most {self._budget.limit}): "
                    f"stopping {self.digest}")
            self._overflow += kept
        self.written += count
        self._wake()

    def _drop_overflow(self) -> None:
        """Give the memory back once the fill ended and its last reader left."""
        if self._overflow:
            self._budget.give_back(len(self._overflow))
            self._overflow = bytearray()

    def _keep_partial(self) -> None:
        """Keep the bytes so far for the next fill, without the preallocated rest."""
        try:
            os.ftruncate(self._fd, self.written)
        except OSError as e:
            log.warning("cannot truncate the spool of %s: %s; not kept", self.digest, e.strerror)
            return
        self.partial = Partial(self.spool, self.written, self._hasher)

    def _fail(self, error: RegistryError) -> None:
        self.error = error
        if not self._started.done():
            self._started.set_exception(error)
            self._started.exception()  # nobody may be waiting; do not warn about it
        if isinstance(error, ANSWERS):
            log.debug("fill of %s: %s", self.digest, error.message)
            return
        self.metrics.fills_failed.inc()
        if self._started_ok():  # its responses end short after a 200: the status page says why
            upstream, _, name = self.sources[0].route.partition("/")
            self.metrics.events.failed(200, upstream, name, self.digest,
                                       f"the blob's responses ended short: {error.message}")
        # Before the headers every waiting request gets the error as its response (and the
        # error middleware logs it per request); after them, this is the one line saying
        # why those responses end short.
        level = logging.WARNING if self._started_ok() else logging.INFO
        log.log(level, "fill of %s failed: %s", self.digest, error.message)

    def _started_ok(self) -> bool:
        return self._started.done() and self._started.exception() is None

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


def _on_own_thread(name: str, work: Callable[..., None], *args: Any) -> asyncio.Future:
    """Run `work` on a thread of its own; a future of the loop for its end.

    Not a pool: a pump lives as long as its body, and a pool's size would cap how many
    fills stream at once below limits.upstream_bodies. Its end is posted after every
    callback `work` posted (call_soon_threadsafe keeps their order), so the awaiting fill
    sees all of them applied."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not ended.done():
            if error is None:
                ended.set_result(None)
            else:
                ended.set_exception(error)

    def run() -> None:
        try:
            work(*args)
        except BaseException as e:  # handed to the awaiting fill, whatever it is
            loop.call_soon_threadsafe(settle, e)
        else:
            loop.call_soon_threadsafe(settle, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return ended
