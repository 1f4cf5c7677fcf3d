"""Blob uploads (OCI distribution-spec "Pushing blobs"): written to disk as they arrive.

    <root>/uploads/<id>        the bytes received so far; its size is the upload's offset
    <root>/uploads/<id>.json   {"name": repository, "created": time}

Nothing is held in memory: each request body is copied to the upload's file chunk by
chunk. An upload survives a restart (its state is those two files), and uploads untouched
for longer than `hosted.upload_ttl` are removed. Finishing an upload hashes the file,
and only a file whose digest matches is moved into the BlobStore.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

from aiohttp import StreamReader

from ..errors import BlobUploadInvalid, BlobUploadUnknown, DigestInvalid, UploadOutOfOrder
from .blobs import BlobStore, write_all

log = logging.getLogger("mirror")

UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
CHUNK = 256 * 1024


class Uploads:
    def __init__(self, root: str | Path, store: BlobStore, ttl: float):
        self.dir = Path(root) / "uploads"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.ttl = ttl
        self.expire()

    def start(self, name: str) -> str:
        upload = uuid.uuid4().hex
        self._data(upload).touch()
        self._meta(upload).write_text(json.dumps({"name": name, "created": time.time()}))
        return upload

    def offset(self, name: str, upload: str) -> int:
        """How many bytes the upload holds; BLOB_UPLOAD_UNKNOWN if it is not `name`'s."""
        try:
            meta = json.loads(self._meta(upload).read_text()) if UPLOAD_ID.fullmatch(upload) else {}
            if meta.get("name") == name:
                return self._data(upload).stat().st_size
        except (OSError, ValueError):
            pass
        raise BlobUploadUnknown(f"no upload {upload[:64]!r} in progress for {name}")

    async def append(self, name: str, upload: str, body: StreamReader,
                     content_range: str | None) -> int:
        """Write a request body at the upload's end; return the new offset.

        A Content-Range `<start>-<end>` that does not start at the current offset is
        out of order (416); a body whose length differs from the range is invalid.
        """
        offset = self.offset(name, upload)
        expected = None
        if content_range:
            m = re.fullmatch(r"(?:bytes[ =])?(\d+)-(\d+)", content_range.strip())
            if not m or int(m.group(2)) < int(m.group(1)):
                raise BlobUploadInvalid(f"invalid Content-Range {content_range[:100]!r}")
            start, end = int(m.group(1)), int(m.group(2))
            if start != offset:
                raise UploadOutOfOrder(
                    f"chunk starts at {start} but the upload holds {offset} bytes",
                    headers=self.range_headers(name, upload, offset))
            expected = end - start + 1
        fd = os.open(self._data(upload), os.O_WRONLY | os.O_APPEND)
        received = 0
        try:
            async for chunk in body.iter_chunked(CHUNK):
                write_all(fd, chunk)
                received += len(chunk)
            if expected is not None and received != expected:
                raise BlobUploadInvalid(f"Content-Range announced {expected} bytes, the body "
                                        f"had {received}")
        except BaseException:
            os.ftruncate(fd, offset)  # a chunk is stored whole or not at all
            raise
        finally:
            os.close(fd)
        return offset + received

    async def finish(self, name: str, upload: str, digest: str) -> int:
        """Verify the upload against `digest`, move it into the store; return its size."""
        self.offset(name, upload)
        data = self._data(upload)
        try:
            actual, size = await asyncio.get_running_loop().run_in_executor(
                None, _hash_and_sync, data, digest.partition(":")[0])
            if actual != digest:
                raise DigestInvalid(f"the upload's content has digest {actual}, not {digest}")
            if self.store.size(digest) is None:
                self.store.commit(data, digest)
            return size
        finally:
            self.cancel(name, upload)

    def cancel(self, name: str, upload: str) -> None:
        self._data(upload).unlink(missing_ok=True)
        self._meta(upload).unlink(missing_ok=True)

    def expire(self) -> None:
        """Remove uploads untouched (no chunk written) for longer than the TTL."""
        cutoff = time.time() - self.ttl
        for data in self.dir.iterdir():
            if data.suffix == ".json":
                continue  # an upload is judged by its data file, which every chunk touches
            try:
                if data.stat().st_mtime < cutoff:
                    self.cancel("", data.name)
                    log.info("removed the upload %s, untouched for %.0fs", data.name, self.ttl)
            except FileNotFoundError:
                pass

    async def expire_forever(self) -> None:
        """Expire abandoned uploads now and then (every TTL/2, at most hourly)."""
        while True:
            await asyncio.sleep(min(self.ttl / 2, 3600.0))
            self.expire()

    def range_headers(self, name: str, upload: str, offset: int) -> dict[str, str]:
        """Location, Range and upload id, as every upload response carries them."""
        return {"Location": f"/v2/{name}/blobs/uploads/{upload}",
                "Range": f"0-{max(offset - 1, 0)}", "Docker-Upload-UUID": upload}

    def _data(self, upload: str) -> Path:
        return self.dir / upload

    def _meta(self, upload: str) -> Path:
        return self.dir / f"{upload}.json"


def _hash_and_sync(path: Path, algorithm: str) -> tuple[str, int]:
    hasher, size = hashlib.new(algorithm), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return f"{algorithm}:{hasher.hexdigest()}", size
