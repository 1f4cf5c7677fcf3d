"""One upstream fetch per digest, spooled to disk and read by every waiting client as it grows.

A `Fill` downloads one blob in its own task: each chunk is written to a spool file and
hashed, and `written` grows. Any number of readers — the client that started the fill and
every client that comes later — read the spool file from their own offset with their own
file descriptor, waiting only for bytes that do not exist yet; so time to first byte stays
close to the upstream's and the upstream is read once. The blob is committed (fsync, then
atomic rename into the BlobStore) only when its size and digest check out.

A reader leaving never stops the fill. The last byte of the blob reaches readers only
after the digest checked out. When the fill fails (upstream cut, wrong digest,
stall), every reader raises `FillFailed` after the bytes it has sent, so a response whose
Content-Length was promised ends short and no client takes it for a whole blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from contextlib import AbstractAsyncContextManager
from typing import AsyncIterator, Callable, Protocol

from .blobs import BlobStore
from .errors import RegistryError, Unavailable

log = logging.getLogger("mirror")

READ_CHUNK = 1 << 20


class Body(Protocol):
    size: int | None

    def chunks(self) -> AsyncIterator[bytes]: ...


Opener = Callable[[], AbstractAsyncContextManager[Body]]


class FillFailed(Exception):
    """The fill a reader was following did not complete; its response must end short."""


class Fill:
    def __init__(self, digest: str, store: BlobStore, open_body: Opener):
        self.digest = digest
        self.store = store
        self.size: int | None = None
        self.written = 0
        self.done = False
        self.verified = False
        self.committed = False
        self.error: RegistryError | None = None
        self._open_body = open_body
        self._fd, self.spool = store.spool()
        self._started = asyncio.get_running_loop().create_future()
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
        except RegistryError as e:
            self._fail(e)
        except Exception as e:  # an OSError (disk full) or a bug must not hang the readers
            log.exception("fill of %s failed", self.digest)
            self._fail(Unavailable(f"fetching {self.digest} failed: {e}"))
        finally:
            os.close(self._fd)
            if not self.committed:
                if self.error is None:  # cancelled: the service is stopping
                    self._fail(Unavailable(f"fetching {self.digest} was cancelled"))
                self.spool.unlink(missing_ok=True)
            self.done = True
            self._wake()

    async def _download(self) -> None:
        algorithm = self.digest.partition(":")[0]
        hasher = hashlib.new(algorithm)
        async with self._open_body() as body:
            self.size = body.size
            self._started.set_result(None)
            async for chunk in body.chunks():
                _write_all(self._fd, chunk)
                hasher.update(chunk)
                self.written += len(chunk)
                self._wake()
        if self.size is not None and self.written != self.size:
            raise Unavailable(f"upstream sent {self.written} of {self.size} bytes of {self.digest}")
        if f"{algorithm}:{hasher.hexdigest()}" != self.digest:
            raise Unavailable(f"upstream sent bytes that do not match {self.digest}; not stored")
        self.size = self.written
        self.verified = True
        self._wake()
        await asyncio.get_running_loop().run_in_executor(None, os.fsync, self._fd)
        self.store.commit(self.spool, self.digest)
        self.committed = True

    def _fail(self, error: RegistryError) -> None:
        self.error = error
        if not self._started.done():
            self._started.set_exception(error)
            self._started.exception()  # nobody may be waiting; do not warn about it
        log.warning("fill of %s failed: %s", self.digest, error.message)

    def _wake(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def read(self, fd: int, start: int, end: int | None) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the blob from `fd` as they arrive (end None: to the end).

        The caller owns `fd` and closes it.
        """
        offset = start
        while end is None or offset < end:
            # The blob's last byte is held back until the digest checked out: a client
            # never receives a complete body of bytes that turn out to be wrong.
            readable = self.written if self.verified else max(self.written - 1, 0)
            available = readable if end is None else min(readable, end)
            if offset < available:
                data = os.pread(fd, min(READ_CHUNK, available - offset), offset)
                offset += len(data)
                yield data
            elif self.done or (self.verified and end is None):
                if self.error is not None:
                    raise FillFailed(self.error.message)
                if end is not None and offset < end:
                    raise FillFailed(f"{self.digest} ended at {offset} of {end} bytes")
                return
            else:
                await self._progress.wait()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Fills:
    """The fills in flight, one per digest."""

    def __init__(self, store: BlobStore):
        self.store = store
        self.active: dict[str, Fill] = {}
        self._tasks: set[asyncio.Task] = set()

    def join(self, digest: str, open_body: Opener) -> tuple[Fill, int]:
        """The fill of `digest` (started if none runs) and a spool descriptor to read it.

        Synchronous on purpose: between finding a fill here and opening its spool there is
        no await, so the fill cannot commit (rename the spool away) in between.
        """
        fill = self.active.get(digest)
        if fill is None:
            fill = Fill(digest, self.store, open_body)
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

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
