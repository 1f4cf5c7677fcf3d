"""A blob's object in the object store, read as a fill's body (fill.py's `Body`).

With S3 and a local tier, a replica that misses a blob locally fills its tier from the
object store exactly as it fills from an upstream: one read per digest however many
clients ask, every reader served from the spool as it grows, the digest checked again
before the local copy is kept (a corrupt object is never served whole). The object
store's own failures become the route errors a fill knows: gone → BlobUnknown (another
replica evicted it), unreachable → Unavailable.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ..errors import BlobUnknown, Unavailable
from ..storage.blobs import BlobStore
from ..storage.s3_io import ObjectMissing, ObjectStoreUnavailable


class ObjectBody:
    def __init__(self, body, start: int):
        self._body = body
        self.start = start
        self.size = body.size

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._body:
                yield chunk
        except ObjectStoreUnavailable as e:
            raise Unavailable(e.message) from e


@contextlib.asynccontextmanager
async def object_body(store: BlobStore, digest: str, start: int) -> AsyncIterator[ObjectBody]:
    assert store.remote is not None
    try:
        body = await store.remote.read(store.object_name(digest), start)
    except ObjectMissing:
        store.forget_remote(digest)
        raise BlobUnknown(f"blob {digest} is no longer in the object store") from None
    except ObjectStoreUnavailable as e:
        raise Unavailable(e.message) from e
    try:
        yield ObjectBody(body, start)
    finally:
        await body.close()
