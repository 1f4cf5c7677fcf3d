"""S3-compatible object storage: one bucket of content-addressed objects, each written once.

Every key starts with `S3Settings.prefix`, so several mirrors (or environments) can share
a bucket:

    <prefix>blobs/sha256/<hex>        a blob, under its digest
    <prefix>manifests/sha256/<hex>    a manifest's bytes, under their digest
    <prefix>uploads/<id>/<n>          chunk n of a push in progress (gone once it commits)

No object is ever seen half-written: a small one is a single PutObject, a big one a
multipart upload that appears only at CompleteMultipartUpload (`ObjectWriter`), and
`put(if_none_match=True)` lets the first of racing replicas win without a lock. Uploads a
killed replica left behind are found by `abort_stale_uploads`.

The client is aiobotocore: the same aiohttp as the mirror, async, and botocore's SigV4
signing, retries and operation models. (obstore was the alternative; it is a Rust wheel
with its own runtime and threads, and gives less control over streaming bodies into our
fill machinery.) Production targets are AWS S3, MinIO, Ceph RGW and GCS's S3 API; the
tests run against a real SeaweedFS.

No botocore or aiohttp exception leaves this module:

    ClientError 404 NoSuchKey, NoSuchUpload  -> ObjectMissing (None where absence is an answer)
    ClientError 403                          -> StorageError naming the access key id
    ClientError 416 InvalidRange             -> RangeInvalid
    5xx, refused, timeouts, cut bodies       -> ObjectStoreUnavailable (503, Retry-After: 10)
    anything else                            -> StorageError
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore import exceptions as boto
from botocore.parsers import ResponseParserError

from ..errors import RangeInvalid, StorageError, storage_error
from .s3_io import ObjectBody, ObjectMissing, ObjectStoreUnavailable, ObjectWriter

log = logging.getLogger("mirror")

MIN_PART = 5 << 20        # S3's smallest part but the last (SeaweedFS enforces it too)
DELETE_BATCH = 1000       # DeleteObjects takes at most 1000 keys

_CREDENTIALS_REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_BUSY = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}
_NETWORK = (boto.HTTPClientError, boto.ConnectionError, boto.IncompleteReadError,
            boto.ChecksumError, ResponseParserError, aiohttp.ClientError,
            asyncio.TimeoutError, OSError)
_NO_CREDENTIALS = (boto.NoCredentialsError, boto.PartialCredentialsError,
                   boto.CredentialRetrievalError)


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None      # e.g. "http://127.0.0.1:8333"; None = AWS
    bucket: str = "mirror"
    region: str = "us-east-1"
    prefix: str = ""                 # key prefix inside the bucket, e.g. "prod/"
    access_key: str | None = None    # None: botocore's usual chain (AWS_ACCESS_KEY_ID etc.)
    secret_key: str | None = None
    redirect: bool = False           # blob GETs answered with a 307 to a presigned URL
    redirect_ttl: float = 300.0      # seconds a presigned URL is valid
    part_size: int = 16 << 20        # multipart part size (S3 minimum 5 MiB)


_CONFIG = AioConfig(
    signature_version="s3v4",
    # Path style works on every S3 clone; virtual hosts need DNS for each bucket name.
    s3={"addressing_style": "path"},
    # botocore >= 1.36 adds CRC trailers to every upload by default, which MinIO before
    # 2023, Ceph RGW and SeaweedFS do not all accept; send checksums only where S3
    # requires them (DeleteObjects).
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
    connect_timeout=5, read_timeout=60,
    retries={"max_attempts": 3, "mode": "standard"},
    max_pool_connections=64,
)


class ObjectStore:
    """One bucket (under a key prefix) of an S3-compatible store, through one client."""

    def __init__(self, settings: S3Settings, client: Any, exits: contextlib.AsyncExitStack,
                 access_key: str | None) -> None:
        self.settings = settings
        self._client = client
        self._exits = exits
        self._access_key = access_key
        self._place = (f"{settings.endpoint} bucket {settings.bucket}" if settings.endpoint
                       else f"AWS S3 ({settings.region}) bucket {settings.bucket}")

    @classmethod
    async def open(cls, settings: S3Settings) -> ObjectStore:
        """A client for `settings`, after a HeadBucket proved the bucket is there for us."""
        if settings.part_size < MIN_PART:
            raise StorageError(f"s3.part_size is {settings.part_size} bytes; S3 refuses "
                               f"parts under {MIN_PART} (5 MiB)")
        session = get_session()
        keys = {}
        if settings.access_key is not None:
            keys = {"aws_access_key_id": settings.access_key,
                    "aws_secret_access_key": settings.secret_key}
        exits = contextlib.AsyncExitStack()
        try:
            client = await exits.enter_async_context(session.create_client(
                "s3", endpoint_url=settings.endpoint, region_name=settings.region,
                config=_CONFIG, **keys))
            store = cls(settings, client, exits, settings.access_key)
            if settings.access_key is None:  # only to name it in messages, never the secret
                with store._errors("loading credentials"):
                    found = await session.get_credentials()
                    if found is not None:
                        store._access_key = (await found.get_frozen_credentials()).access_key
            await store._head_bucket("open")
        except BaseException:
            await exits.aclose()
            raise
        return store

    async def close(self) -> None:
        await self._exits.aclose()

    def key(self, name: str) -> str:
        return self.settings.prefix + name

    async def check(self) -> None:
        """Readiness: the bucket answers HeadBucket for our credentials."""
        try:
            await self._head_bucket("check")
        except ObjectStoreUnavailable:
            raise
        except StorageError as e:  # a missing bucket or refused key: not ready either
            raise ObjectStoreUnavailable(e.message, e.detail) from e

    async def size(self, name: str) -> int | None:
        try:
            with self._errors("HeadObject", name):
                answer = await self._client.head_object(Bucket=self.settings.bucket,
                                                        Key=self.key(name))
        except ObjectMissing:
            return None
        return int(answer["ContentLength"])

    async def read(self, name: str, start: int = 0, end: int | None = None) -> ObjectBody:
        """Bytes start..end (inclusive; None: to the end) of an object, as a stream."""
        args: dict[str, Any] = {"Bucket": self.settings.bucket, "Key": self.key(name)}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end}"
        with self._errors("GetObject", name):
            answer = await self._client.get_object(**args)
        stream = answer["Body"]
        length = int(answer["ContentLength"])
        total = (answer.get("ContentRange") or "").rpartition("/")[2]
        if "Range" in args and answer["ResponseMetadata"]["HTTPStatusCode"] != 206:
            stream.close()
            raise StorageError(f"{self._place} ignored the Range header of a GetObject "
                               f"of {self.key(name)}")
        size = int(total) if total.isdigit() else start + length
        return ObjectBody(self, name, stream, size, length)

    async def get(self, name: str) -> bytes | None:
        """A small object, whole; None when there is none."""
        try:
            with self._errors("GetObject", name):
                answer = await self._client.get_object(Bucket=self.settings.bucket,
                                                       Key=self.key(name))
                async with answer["Body"] as stream:
                    return await stream.read()
        except ObjectMissing:
            return None

    async def put(self, name: str, data: bytes, *, metadata: dict[str, str] | None = None,
                  if_none_match: bool = False) -> bool:
        """Write an object whole. With `if_none_match`, only when the key is free: False
        when it was already there (412), and the existing object is kept."""
        args: dict[str, Any] = {"Bucket": self.settings.bucket, "Key": self.key(name),
                                "Body": data}
        if metadata:
            args["Metadata"] = metadata
        if if_none_match:
            # Conditional writes: AWS since 2024-08, MinIO, SeaweedFS (412 measured); a
            # store without them overwrites, which for content-addressed keys writes the
            # same bytes again.
            args["IfNoneMatch"] = "*"
        attempt = 0
        while True:
            with self._errors("PutObject", name):
                try:
                    await self._client.put_object(**args)
                    return True
                except boto.ClientError as e:
                    if if_none_match and _status(e) == 412:
                        return False
                    # AWS answers 409 while another conditional write of the key is in
                    # flight, and asks the client to retry.
                    if not (if_none_match and _status(e) == 409 and attempt < 2):
                        raise
            attempt += 1
            await asyncio.sleep(0.2 * attempt)

    def writer(self, name: str) -> ObjectWriter:
        return ObjectWriter(self, name)

    async def upload_file(self, name: str, path: os.PathLike, size: int) -> None:
        """A local file (a spool) as an object, read on a worker thread one part at a time."""
        loop = asyncio.get_running_loop()
        try:
            file = await loop.run_in_executor(None, open, path, "rb")
        except OSError as e:
            raise _local_error(e, path) from e
        try:
            async with self.writer(name) as writer:
                while writer.size <= size:
                    try:
                        chunk = await loop.run_in_executor(None, file.read,
                                                           self.settings.part_size)
                    except OSError as e:
                        raise _local_error(e, path) from e
                    if not chunk:
                        break
                    await writer.write(chunk)
                if writer.size != size:
                    raise StorageError(f"{os.fspath(path)} has {writer.size} bytes, not the "
                                       f"{size} expected; {self.key(name)} was not written")
                await writer.complete()
        finally:
            file.close()

    async def delete(self, name: str) -> None:
        """Remove an object; removing one that is not there is fine."""
        with self._errors("DeleteObject", name):
            try:
                await self._client.delete_object(Bucket=self.settings.bucket,
                                                 Key=self.key(name))
            except boto.ClientError as e:
                if _status(e) != 404:
                    raise

    async def delete_many(self, names: builtins.list[str]) -> None:
        for start in range(0, len(names), DELETE_BATCH):
            batch = names[start:start + DELETE_BATCH]
            with self._errors(f"DeleteObjects ({len(batch)} keys)"):
                answer = await self._client.delete_objects(
                    Bucket=self.settings.bucket, Delete={
                        "Objects": [{"Key": self.key(n)} for n in batch], "Quiet": True})
            failed = [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if failed:
                first = failed[0]
                raise StorageError(
                    f"{self._place} did not delete {len(failed)} of {len(batch)} objects; "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}")

    async def list(self, prefix: str) -> AsyncIterator[tuple[str, int, float]]:
        """(name, size, last-modified epoch) of every object whose name starts with prefix."""
        cut = len(self.settings.prefix)
        async for page in self._pages("list_objects_v2", Prefix=self.key(prefix)):
            for item in page.get("Contents", []):
                yield item["Key"][cut:], int(item["Size"]), item["LastModified"].timestamp()

    async def presign_get(self, name: str, expires: float | None = None) -> str:
        """A URL anyone may GET the object with until it expires (signed here, no request)."""
        seconds = self.settings.redirect_ttl if expires is None else expires
        with self._errors("presign GetObject", name):
            return await self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.settings.bucket, "Key": self.key(name)},
                ExpiresIn=max(1, round(seconds)))

    async def abort_stale_uploads(self, older_than: float) -> int:
        """Abort multipart uploads under our prefix begun more than `older_than` seconds
        ago: what replicas killed mid-write left. Returns how many."""
        cutoff = time.time() - older_than
        stale = []
        async for page in self._pages("list_multipart_uploads", Prefix=self.settings.prefix):
            # An upload without `Initiated` (some S3-compatible stores leave it out) has no
            # age to judge: it is left alone, never aborted under a writer still using it.
            stale += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])
                      if u.get("Initiated") is not None and u["Initiated"].timestamp() < cutoff]
        for key, upload_id in stale:
            await self._abort_upload(key, upload_id)
        if stale:
            log.info("aborted %d stale multipart uploads in %s", len(stale), self._place)
        return len(stale)

    # -- helpers -------------------------------------------------------------------------

    async def _head_bucket(self, action: str) -> None:
        with self._errors(f"HeadBucket ({action})"):
            try:
                await self._client.head_bucket(Bucket=self.settings.bucket)
            except boto.ClientError as e:
                if _status(e) == 404:
                    raise StorageError(f"bucket {self.settings.bucket} does not exist at "
                                       f"{self.settings.endpoint or 'AWS S3'}; create it, "
                                       "or check storage.s3.bucket") from e
                raise

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        with self._errors("AbortMultipartUpload", key[len(self.settings.prefix):]):
            try:
                await self._client.abort_multipart_upload(
                    Bucket=self.settings.bucket, Key=key, UploadId=upload_id)
            except boto.ClientError as e:
                if _status(e) != 404:  # already gone: completed or aborted elsewhere
                    raise

    async def _pages(self, operation: str, **args: Any) -> AsyncIterator[dict]:
        pages = self._client.get_paginator(operation).paginate(
            Bucket=self.settings.bucket, **args).__aiter__()
        while True:
            with self._errors(f"{operation} of prefix {args.get('Prefix')!r}"):
                page = await anext(pages, None)
            if page is None:
                return
            yield page

    @contextlib.contextmanager
    def _errors(self, action: str, name: str | None = None) -> Iterator[None]:
        """Turn whatever botocore or aiohttp raised in the block into our StorageErrors."""
        what = f"{action} of {self.key(name)}" if name is not None else action
        try:
            yield
        except StorageError:
            raise
        except boto.ClientError as e:
            raise self._client_error(e, what) from e
        except _NO_CREDENTIALS as e:
            raise StorageError(f"no credentials for {self._place}: {e}; set "
                               "storage.s3.access_key and secret_key, or AWS_ACCESS_KEY_ID"
                               ) from e
        except _NETWORK as e:
            raise self._unavailable(what, f"{type(e).__name__}: {e}") from e
        except boto.BotoCoreError as e:
            raise StorageError(f"{what} in {self._place} failed: {e}") from e

    def _client_error(self, e: boto.ClientError, what: str) -> StorageError:
        status = _status(e)
        error = e.response.get("Error", {})
        code, message = str(error.get("Code", status)), error.get("Message", "")
        if code == "NoSuchBucket":
            return StorageError(f"{what}: bucket {self.settings.bucket} does not exist at "
                                f"{self.settings.endpoint or 'AWS S3'}; create it, or check "
                                "storage.s3.bucket")
        if status == 404 or code in ("NoSuchKey", "NoSuchUpload", "NotFound"):
            return ObjectMissing(f"{what}: not found in {self._place} ({code})")
        if status == 403 or code in _CREDENTIALS_REFUSED:
            return StorageError(
                f"{self._place} refused the credentials of access key {self._access_key!r} "
                f"for {what} ({code} {message}); check storage.s3.access_key, secret_key and "
                "the key's permissions on the bucket")
        if status == 416 or code == "InvalidRange":
            return RangeInvalid(f"{what}: the range is past the end of the object")
        if status >= 500 or code in _BUSY:
            return self._unavailable(what, f"{status} {code} {message}".strip())
        return StorageError(f"{what} in {self._place} failed: {status} {code} {message}")

    def _unavailable(self, what: str, reason: str) -> ObjectStoreUnavailable:
        where = self.settings.endpoint or f"AWS S3 ({self.settings.region})"
        return ObjectStoreUnavailable(
            f"the object store at {where} (bucket {self.settings.bucket}) did not answer "
            f"{what}: {reason}; check that it is running and reachable, and "
            "storage.s3.endpoint",
            detail={"endpoint": where, "bucket": self.settings.bucket})


def _status(error: boto.ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _local_error(error: OSError, path: os.PathLike) -> StorageError:
    if error.filename is None:
        error.filename = os.fspath(path)
    return storage_error(error)
