"""ObjectUploads: blob uploads when blobs live in S3, so a push may spread over replicas.

A load balancer sends a push's POST, PATCHes and PUT to whichever replica it likes, so no
part of an upload may live on one replica's disk or in its memory:

    Redis   <cluster>:upload:<id>      hash {name, client, created, offset, chunks}
                                       (expires upload_ttl after its last chunk)
            <cluster>:uploads:<client> set of that client's uploads in progress
    S3      <prefix>uploads/<id>/<n>   chunk n of the upload, as its PATCH brought it

A chunk is streamed into its own object as it arrives (s3.py's writer: a multipart upload
for a big one) and is entered in the record only once it is complete and the record's
offset is still the one it started at (WATCH): a chunk is stored whole or not at all, and
two PATCHes racing on different replicas cannot both land. Finishing reads the chunks in
order, hashes them and writes the blob's object as it goes; the object is completed only
when the digest checked out and aborted otherwise, so nothing unverified is ever visible
under a blob's key. (Python's sha256 state cannot be carried from one replica to the next,
so the bytes are read once more at the end; a chunk's upload cannot be avoided anyway.)

A replica killed mid-chunk leaves an unfinished multipart upload, aborted by the sweep
after upload_ttl (`ObjectStore.abort_stale_uploads`); an upload whose record expired
leaves chunk objects, which the sweep deletes. The sweep runs on every replica and is
idempotent. `total_bytes()` (for the budget) is the sum of the records' offsets as of the
last sweep.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import Any

from aiohttp import StreamReader
from redis import exceptions as redis_errors

from ..errors import (
    BlobUploadInvalid,
    BlobUploadTooLarge,
    BlobUploadUnknown,
    DigestInvalid,
    UploadOutOfOrder,
)
from .blobs import BlobStore
from .metadata import MetadataUnavailable
from .uploads import CHUNK, UPLOAD_ID, check_per_client, parse_content_range, range_headers

log = logging.getLogger("mirror")

# Chunk objects older than this with no record are an expired upload's leftovers.
ORPHAN_SECONDS = 300.0


class ObjectUploads:
    def __init__(self, store: BlobStore, redis: Any, prefix: str, ttl: float, *,
                 max_size: int | None = None, per_client: int | None = None):
        assert store.remote is not None
        self.store = store
        self.objects = store.remote
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl
        self.max_size = max_size
        self.per_client = per_client
        self._bytes = 0  # uploads' bytes in the object store, as of the last sweep

    def _record(self, upload: str) -> str:
        return f"{self.prefix}upload:{upload}"

    def _client(self, client: str) -> str:
        return f"{self.prefix}uploads:{client}"

    async def _call(self, coroutine):
        try:
            return await coroutine
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
            raise MetadataUnavailable(f"the upload records (Redis) are unreachable: {e}; "
                                      "push again once Redis is back") from None

    async def start(self, name: str, client: str | None = None) -> str:
        if client is not None and self.per_client is not None:
            check_per_client(client, await self._running(client), self.per_client)
        upload = uuid.uuid4().hex
        async with self.redis.pipeline(transaction=True) as tx:
            tx.hset(self._record(upload), mapping={
                "name": name, "client": client or "", "created": time.time(), "offset": 0,
                "chunks": 0})
            tx.expire(self._record(upload), int(self.ttl) + 1)
            if client is not None:
                tx.sadd(self._client(client), upload)
                tx.expire(self._client(client), int(self.ttl) + 1)
            await self._call(tx.execute())
        return upload

    async def _running(self, client: str) -> int:
        """Uploads of `client` still in progress (members whose record expired are pruned)."""
        members = [m.decode() if isinstance(m, bytes) else m for m in
                   await self._call(self.redis.smembers(self._client(client)))]
        alive = await self._alive(members)
        gone = [m for m, up in zip(members, alive) if not up]
        if gone:
            await self._call(self.redis.srem(self._client(client), *gone))
        return sum(alive)

    async def _alive(self, uploads: list[str]) -> list[bool]:
        """Whether each upload's record still exists: one round trip for all of them."""
        if not uploads:
            return []
        async with self.redis.pipeline(transaction=False) as batch:
            for upload in uploads:
                batch.exists(self._record(upload))
            return [bool(n) for n in await self._call(batch.execute())]

    async def _state(self, name: str, upload: str) -> dict[str, str]:
        if UPLOAD_ID.fullmatch(upload):
            raw = await self._call(self.redis.hgetall(self._record(upload)))
            state = {(k.decode() if isinstance(k, bytes) else k):
                     (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
            if state.get("name") == name:
                return state
        raise BlobUploadUnknown(f"no upload {upload[:64]!r} in progress for {name}")

    async def offset(self, name: str, upload: str) -> int:
        return int((await self._state(name, upload))["offset"])

    async def append(self, name: str, upload: str, body: StreamReader,
                     content_range: str | None, content_length: int | None = None) -> int:
        """Store a request body as the upload's next chunk; the new offset (uploads.py's
        rules: 416 out of order, 413 past max_size, a chunk whole or not at all)."""
        state = await self._state(name, upload)
        offset, index = int(state["offset"]), int(state["chunks"])
        expected = parse_content_range(content_range, offset,
                                       range_headers(name, upload, offset))
        announced = expected if expected is not None else content_length
        if announced is not None:
            await self._check_size(name, upload, offset + announced)
        chunk_name = f"uploads/{upload}/{index:08d}"
        received = 0
        async with self.objects.writer(chunk_name) as writer:
            async for data in body.iter_chunked(CHUNK):
                received += len(data)
                await self._check_size(name, upload, offset + received)
                await writer.write(data)
            if expected is not None and received != expected:
                raise BlobUploadInvalid(f"Content-Range announced {expected} bytes, the body "
                                        f"had {received}")
            if received == 0:
                return offset  # nothing to add (an empty PUT that only finishes)
            await writer.complete()
        if not await self._enter(upload, offset, index, received):
            await self.objects.delete(chunk_name)
            raise UploadOutOfOrder(f"another chunk of the upload landed first at {offset}",
                                   headers=self.range_headers(name, upload,
                                                              await self.offset(name, upload)))
        return offset + received

    async def _enter(self, upload: str, offset: int, index: int, received: int) -> bool:
        """Add a stored chunk to the record, if nothing else was added since it began."""
        key = self._record(upload)
        async with self.redis.pipeline(transaction=True) as tx:
            try:
                await self._call(tx.watch(key))
                now = await self._call(tx.hmget(key, "offset", "chunks"))
                if now[0] is None or (int(now[0]), int(now[1])) != (offset, index):
                    return False
                tx.multi()
                tx.hset(key, mapping={"offset": offset + received, "chunks": index + 1})
                tx.expire(key, int(self.ttl) + 1)
                await self._call(tx.execute())
                return True
            except redis_errors.WatchError:
                return False

    async def _check_size(self, name: str, upload: str, size: int) -> None:
        if self.max_size is None or size <= self.max_size:
            return
        await self._remove(upload)
        raise BlobUploadTooLarge(
            f"the upload to {name} would hold more than {self.max_size} bytes, the most one "
            "blob may have here (hosted.max_upload_size); the upload was removed")

    async def finish(self, name: str, upload: str, digest: str) -> int:
        """Hash the chunks in order into the blob's object; complete it only if the digest
        checks out. The upload is removed either way; its size."""
        state = await self._state(name, upload)
        size, chunks = int(state["offset"]), int(state["chunks"])
        algorithm = digest.partition(":")[0]
        try:
            if await self.store.stat(digest) == size:
                # Stored already (pushed before, or cached): the bytes are still checked.
                await self._hash(upload, chunks, algorithm, None, digest)
            else:
                async with self.objects.writer(self.store.object_name(digest)) as writer:
                    await self._hash(upload, chunks, algorithm, writer, digest)
                    await writer.complete()
                self.store.usage.record_blob(digest, size)
                await self.store.usage.flush()  # every replica sees it before the 201
            return size
        finally:
            await self._remove(upload, chunks)

    async def _hash(self, upload: str, chunks: int, algorithm: str, writer, digest: str) -> None:
        """Read the chunks in order (into `writer`, if any); DigestInvalid on a mismatch."""
        hasher = hashlib.new(algorithm)
        for index in range(chunks):
            body = await self.objects.read(f"uploads/{upload}/{index:08d}")
            try:
                async for data in body:
                    hasher.update(data)
                    if writer is not None:
                        await writer.write(data)
            finally:
                await body.close()
        actual = f"{algorithm}:{hasher.hexdigest()}"
        if actual != digest:
            raise DigestInvalid(f"the upload's content has digest {actual}, not {digest}")

    async def cancel(self, name: str, upload: str) -> None:
        """Remove the upload; one already gone (finished, expired) is no error."""
        try:
            state = await self._state(name, upload)
        except BlobUploadUnknown:
            return
        await self._remove(upload, int(state["chunks"]))

    async def _remove(self, upload: str, chunks: int | None = None) -> None:
        raw_chunks, raw_client = await self._call(
            self.redis.hmget(self._record(upload), "chunks", "client"))
        if chunks is None:
            chunks = int(raw_chunks) if raw_chunks is not None else 0
        async with self.redis.pipeline(transaction=True) as tx:
            tx.delete(self._record(upload))
            if raw_client:
                client = raw_client.decode() if isinstance(raw_client, bytes) else raw_client
                tx.srem(self._client(client), upload)
            await self._call(tx.execute())
        if chunks:
            await self.objects.delete_many([f"uploads/{upload}/{i:08d}" for i in range(chunks)])

    def total_bytes(self) -> int:
        return self._bytes

    async def sweep(self) -> None:
        """Delete chunks of uploads whose record expired, abort multipart uploads a killed
        replica left, and count what live uploads hold."""
        by_upload: dict[str, list[tuple[str, int, float]]] = {}
        async for name, size, modified in self.objects.list("uploads/"):
            upload = name.split("/")[1] if name.count("/") >= 2 else ""
            by_upload.setdefault(upload, []).append((name, size, modified))
        live, stale = 0, []
        cutoff = time.time() - ORPHAN_SECONDS
        alive = await self._alive(list(by_upload))
        for (upload, objects), up in zip(by_upload.items(), alive):
            if up:
                live += sum(size for _, size, _ in objects)
            elif all(modified < cutoff for _, _, modified in objects):
                stale.extend(name for name, _, _ in objects)
        if stale:
            await self.objects.delete_many(stale)
            log.info("removed %d chunk object(s) of expired uploads", len(stale))
        aborted = await self.objects.abort_stale_uploads(self.ttl)
        if aborted:
            log.info("aborted %d unfinished multipart upload(s) older than %.0fs", aborted,
                     self.ttl)
        self._bytes = live

    async def expire_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.ttl / 2, 600.0))
            try:
                await self.sweep()
            except Exception as e:  # the next pass tries again
                log.error("sweeping uploads in the object store failed: %s",
                          getattr(e, "message", e))

    range_headers = staticmethod(range_headers)

