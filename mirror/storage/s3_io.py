"""ObjectBody and ObjectWriter: one object read as it arrives, and one written as it comes
(visible only once complete() returned). ObjectStore (s3.py) hands them out; their
failures go through its error mapping. The store's two failures live here too, so that the
code catching them (cache/objects.py, api/responses.py) does not import aiobotocore at every
start, S3 or not (~0.2-0.3 s)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Self

from ..errors import StorageError

if TYPE_CHECKING:
    from .s3 import ObjectStore


class ObjectStoreUnavailable(StorageError):
    """The object store did not answer (refused, timed out, 5xx); worth retrying later."""

    code, status = "UNAVAILABLE", 503

    def __init__(self, message: str, detail: object = None, headers: dict | None = None):
        super().__init__(message, detail, {"Retry-After": "10", **(headers or {})})


class ObjectMissing(StorageError):
    """An object (or multipart upload) that must exist does not: our bug, or a race."""


log = logging.getLogger("mirror")

CHUNK = 1 << 20           # what one iteration of an ObjectBody yields, at most


class ObjectBody:
    """One GetObject answer, read as it arrives: `size` is the whole object's size,
    `length` the bytes in this answer (less when a range was asked for)."""

    def __init__(self, store: ObjectStore, name: str, stream: Any, size: int,
                 length: int) -> None:
        self._store = store
        self._name = name
        self._stream = stream
        self.size = size
        self.length = length

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            # aiobotocore raises IncompleteReadError when the body ends short of its
            # Content-Length, so a cut body cannot pass for a complete one.
            with self._store._errors("GetObject body", self._name):
                chunk = await self._stream.read(CHUNK)
            if not chunk:
                return
            yield chunk

    async def close(self) -> None:
        self._stream.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ObjectWriter:
    """A streamed write of one object, visible only once complete() returned.

    write() buffers up to `part_size` and sends a part whenever more bytes follow a full
    one, so the last part is never empty and an object of one part or less costs a single
    PutObject (the multipart upload begins lazily, at the first full part). complete() is
    explicit because the caller checks the digest first: leaving `async with` without it,
    by an exception or not, aborts, and nothing appears under the key.
    """

    def __init__(self, store: ObjectStore, name: str) -> None:
        self._store = store
        self.name = name
        self.size = 0                 # bytes written so far
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._state = "open"          # then "completed" or "aborted"

    async def write(self, data: bytes) -> None:
        self._check_open()
        self._buffer += data
        self.size += len(data)
        part_size = self._store.settings.part_size
        while len(self._buffer) > part_size:
            await self._upload_part(bytes(self._buffer[:part_size]))
            del self._buffer[:part_size]

    async def complete(self) -> None:
        self._check_open()
        store = self._store
        try:
            if self._upload_id is None:
                with store._errors("PutObject", self.name):
                    await store._client.put_object(Bucket=store.settings.bucket,
                                                   Key=store.key(self.name),
                                                   Body=bytes(self._buffer))
            else:
                await self._upload_part(bytes(self._buffer))
                with store._errors("CompleteMultipartUpload", self.name):
                    await store._client.complete_multipart_upload(
                        Bucket=store.settings.bucket, Key=store.key(self.name),
                        UploadId=self._upload_id, MultipartUpload={"Parts": self._parts})
        except BaseException:
            await self._abort_quietly()
            raise
        self._state = "completed"
        self._buffer = bytearray()

    async def abort(self) -> None:
        """Drop what was written; the multipart upload, if one began, is aborted."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buffer = bytearray()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            await self._store._abort_upload(self._store.key(self.name), upload_id)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._abort_quietly()

    async def _upload_part(self, body: bytes) -> None:
        store = self._store
        with store._errors("UploadPart", self.name):
            if self._upload_id is None:
                created = await store._client.create_multipart_upload(
                    Bucket=store.settings.bucket, Key=store.key(self.name))
                self._upload_id = created["UploadId"]
            number = len(self._parts) + 1
            answer = await store._client.upload_part(
                Bucket=store.settings.bucket, Key=store.key(self.name),
                UploadId=self._upload_id, PartNumber=number, Body=body)
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    async def _abort_quietly(self) -> None:
        try:
            await self.abort()
        except StorageError as e:
            # The caller's own error matters more; abort_stale_uploads collects the rest.
            log.warning("could not abort the upload of %s: %s", self._store.key(self.name),
                        e.message)

    def _check_open(self) -> None:
        if self._state != "open":
            raise StorageError(f"the write of {self._store.key(self.name)} was already "
                               f"{self._state}")
