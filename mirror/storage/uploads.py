"""Blob uploads (OCI distribution-spec "Pushing blobs"): written to disk as they arrive.

    <root>/uploads/<id>        the bytes received so far; its size is the upload's offset
    <root>/uploads/<id>.json   {"name": repository, "created": time, "client": address}

Nothing is held in memory: each request body is copied to the upload's file chunk by
chunk, on a worker thread. An upload survives a restart (its state is those two files),
and uploads untouched for longer than `hosted.upload_ttl` are removed (so is a record whose
data file is gone, as a crash right after a commit leaves it). Finishing an upload
hashes the file, and only a file whose digest matches is moved into the BlobStore (whose
commit fsyncs the directory after the rename).

Limits: an upload may hold at most `hosted.max_upload_size` bytes (413, also when a
Content-Length announces more), and one client address may have at most
`hosted.max_uploads_per_client` uploads in progress (started, not yet finished, cancelled
or expired; 429 past it). A chunk is stored whole or not at all. An upload that can never
finish is removed at once rather than left for the TTL: one that passed the size limit,
and one whose chunk met a full disk (507) — clients restart a blob push from its POST
after a failed chunk (Docker and containerd do), so its earlier chunks would only hold
space on a disk that has none. `total_bytes()` is what uploads in progress hold on disk,
for the disk budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

from aiohttp import StreamReader

from ..errors import (
    BlobUploadInvalid,
    BlobUploadTooLarge,
    BlobUploadUnknown,
    DigestInvalid,
    StorageFull,
    TooManyRequests,
    UploadOutOfOrder,
    storage_error,
)
from .blobs import BlobStore, write_all

log = logging.getLogger("mirror")

UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
CHUNK = 1 << 20
# What a client that hit max_uploads_per_client is told to wait before it tries again.
RETRY_AFTER = "10"


class Uploads:
    def __init__(self, root: str | Path, store: BlobStore, ttl: float, *,
                 max_size: int | None = None, per_client: int | None = None):
        self.dir = Path(root) / "uploads"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.ttl = ttl
        self.max_size = max_size
        self.per_client = per_client
        self._clients: dict[str, set[str]] = {}  # client address -> its uploads in progress
        self.expire()
        for meta in self.dir.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                client = json.loads(meta.read_text()).get("client")
                if client is not None and self._data(meta.stem).exists():
                    self._clients.setdefault(client, set()).add(meta.stem)

    async def start(self, name: str, client: str | None = None) -> str:
        """A new upload for `name`; 429 when `client` has too many in progress."""
        if client is not None and self.per_client is not None:
            check_per_client(client, len(self._clients.get(client, ())), self.per_client)
        upload = uuid.uuid4().hex
        try:
            self._data(upload).touch()
            self._meta(upload).write_text(json.dumps(
                {"name": name, "created": time.time(), "client": client}))
        except OSError as e:
            self._remove(upload)  # no 0-byte record of an upload that never started
            raise storage_error(e, self.store.root) from e
        if client is not None:
            self._clients.setdefault(client, set()).add(upload)
        return upload

    async def offset(self, name: str, upload: str) -> int:
        return self._offset(name, upload)

    def _offset(self, name: str, upload: str) -> int:
        """How many bytes the upload holds; BLOB_UPLOAD_UNKNOWN if it is not `name`'s."""
        try:
            meta = json.loads(self._meta(upload).read_text()) if UPLOAD_ID.fullmatch(upload) else {}
            if meta.get("name") == name:
                return self._data(upload).stat().st_size
        except (OSError, ValueError):
            pass
        raise BlobUploadUnknown(f"no upload {upload[:64]!r} in progress for {name}")

    async def append(self, name: str, upload: str, body: StreamReader,
                     content_range: str | None, content_length: int | None = None) -> int:
        """Write a request body at the upload's end; return the new offset.

        A Content-Range `<start>-<end>` that does not start at the current offset is
        out of order (416); a body whose length differs from the range is invalid. A body
        that would take the upload past max_size is 413 (before it is read, when its
        Content-Length says so), and a full disk is 507: both remove the upload.
        """
        offset = self._offset(name, upload)
        expected = parse_content_range(content_range, offset,
                                       range_headers(name, upload, offset))
        announced = expected if expected is not None else content_length
        if announced is not None:
            self._check_size(name, upload, offset + announced)
        loop = asyncio.get_running_loop()
        fd = os.open(self._data(upload), os.O_WRONLY | os.O_APPEND)
        received = 0
        # Each chunk is written on a thread while the next one is read from the socket.
        writing: asyncio.Future | None = None
        try:
            async for chunk in body.iter_chunked(CHUNK):
                self._check_size(name, upload, offset + received + len(chunk), fd, offset)
                if writing is not None:
                    await writing
                writing = loop.run_in_executor(None, write_all, fd, chunk)
                received += len(chunk)
            if writing is not None:
                await writing
            if expected is not None and received != expected:
                raise BlobUploadInvalid(f"Content-Range announced {expected} bytes, the body "
                                        f"had {received}")
        except OSError as e:
            await _settled(writing)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, offset)  # a chunk is stored whole or not at all
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise  # the client's socket, or another file error: the middleware tells
            self._remove(upload)
            full = storage_error(e, self.store.root)
            raise StorageFull(f"{full.message}; the upload was removed: push the blob "
                              "again once there is space", detail=full.detail) from e
        except BaseException:
            await _settled(writing)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, offset)
            raise
        finally:
            os.close(fd)
        return offset + received

    def _check_size(self, name: str, upload: str, size: int, fd: int | None = None,
                    offset: int = 0) -> None:
        if self.max_size is None or size <= self.max_size:
            return
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, offset)
        self._remove(upload)  # it can never finish
        raise BlobUploadTooLarge(
            f"the upload to {name} would hold more than {self.max_size} bytes, the most one "
            "blob may have here (hosted.max_upload_size); the upload was removed")

    async def finish(self, name: str, upload: str, digest: str) -> int:
        """Verify the upload against `digest`, move it into the store; return its size."""
        self._offset(name, upload)
        data = self._data(upload)
        try:
            actual, size = await asyncio.get_running_loop().run_in_executor(
                None, _hash_and_sync, data, digest.partition(":")[0])
            if actual != digest:
                raise DigestInvalid(f"the upload's content has digest {actual}, not {digest}")
            if self.store.size(digest) is None:
                await self.store.commit_async(data, digest)
            return size
        except OSError as e:
            raise storage_error(e, self.store.root) from e
        finally:
            self._remove(upload)

    async def cancel(self, name: str, upload: str) -> None:
        self._remove(upload)

    def _remove(self, upload: str) -> None:
        self._data(upload).unlink(missing_ok=True)
        self._meta(upload).unlink(missing_ok=True)
        for client, uploads in list(self._clients.items()):
            uploads.discard(upload)
            if not uploads:
                del self._clients[client]

    def total_bytes(self) -> int:
        """Bytes the uploads in progress hold on disk."""
        total = 0
        for data in self.dir.iterdir():
            if data.suffix != ".json":
                with contextlib.suppress(FileNotFoundError):
                    total += data.stat().st_size
        return total

    def expire(self) -> None:
        """Remove uploads untouched (no chunk written) for longer than the TTL."""
        for upload in self._expired():
            self._remove(upload)
            log.info("removed the upload %s, untouched for %.0fs", upload, self.ttl)

    def _expired(self) -> list[str]:
        cutoff = time.time() - self.ttl
        expired = []
        for path in self.dir.iterdir():
            # An upload is judged by its data file, which every chunk touches; a record
            # whose data is gone (a crash between a commit and the record's removal) by
            # its own age.
            if path.suffix == ".json" and self._data(path.stem).exists():
                continue
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    expired.append(path.stem if path.suffix == ".json" else path.name)
        return expired

    async def expire_forever(self) -> None:
        """Expire abandoned uploads now and then (every TTL/2, at most hourly); a failed
        pass is logged and the next one tries again."""
        while True:
            await asyncio.sleep(min(self.ttl / 2, 3600.0))
            try:
                # The directory walk on a worker thread; the bookkeeping here, on the loop.
                for upload in await asyncio.get_running_loop().run_in_executor(
                        None, self._expired):
                    self._remove(upload)
                    log.info("removed the upload %s, untouched for %.0fs", upload, self.ttl)
            except OSError as e:
                log.error("expiring uploads in %s failed: %s", self.dir, e)
            except Exception:
                log.exception("expiring uploads in %s failed", self.dir)

    def range_headers(self, name: str, upload: str, offset: int) -> dict[str, str]:
        return range_headers(name, upload, offset)

    def _data(self, upload: str) -> Path:
        return self.dir / upload

    def _meta(self, upload: str) -> Path:
        return self.dir / f"{upload}.json"


def check_per_client(client: str, running: int, limit: int) -> None:
    """429 when `client` has `limit` uploads in progress already."""
    if running >= limit:
        raise TooManyRequests(
            f"{client} has {running} uploads in progress, the most one client may have "
            "(hosted.max_uploads_per_client); finish or cancel one first",
            headers={"Retry-After": RETRY_AFTER})


def range_headers(name: str, upload: str, offset: int) -> dict[str, str]:
    """Location, Range and upload id, as every upload response carries them."""
    return {"Location": f"/v2/{name}/blobs/uploads/{upload}",
            "Range": f"0-{max(offset - 1, 0)}", "Docker-Upload-UUID": upload}


def parse_content_range(content_range: str | None, offset: int,
                        headers: dict[str, str]) -> int | None:
    """The length a chunk's Content-Range `<start>-<end>` announces (None without one);
    BLOB_UPLOAD_INVALID when it is malformed, 416 (with `headers`) when it does not start
    at the upload's `offset`."""
    if not content_range:
        return None
    # ASCII digits, at most 19 (no upload is larger): a 5000-digit number is past
    # int()'s limit and would raise ValueError.
    m = re.fullmatch(r"(?:bytes[ =])?([0-9]{1,19})-([0-9]{1,19})", content_range.strip())
    if not m or int(m.group(2)) < int(m.group(1)):
        raise BlobUploadInvalid(f"invalid Content-Range {content_range[:100]!r}")
    start, end = int(m.group(1)), int(m.group(2))
    if start != offset:
        raise UploadOutOfOrder(f"chunk starts at {start} but the upload holds {offset} bytes",
                               headers=headers)
    return end - start + 1


async def _settled(writing: asyncio.Future | None) -> None:
    """Wait for a write still running on its thread (before the file is truncated)."""
    if writing is not None:
        with contextlib.suppress(BaseException):
            await asyncio.shield(writing)


def _hash_and_sync(path: Path, algorithm: str) -> tuple[str, int]:
    hasher, size = hashlib.new(algorithm), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return f"{algorithm}:{hasher.hexdigest()}", size
