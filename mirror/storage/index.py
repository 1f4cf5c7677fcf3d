"""Index: the metadata store (metadata.py) with its in-memory tier in front of it.

Manifests are also held in a small in-process LRU and tag records in the memory tier
(memory.py), so a warm manifest request does no database read at all. Upstream tag lists
are held parsed for `HOT_TAG_SECONDS` too: a `tags/list` page of a repository with 10,000
tags then costs a bisection, not a read and parse of the whole list. Everything durable
is in the `Metadata` backend; what is here is a copy that a restart simply re-reads.
Blobs are not here: they are files (blobs.py).

With S3 (`remote` set) every manifest is also written to the object store, as
`<prefix>manifests/<algorithm>/<hex>` holding its media type, a newline and its bytes,
before the metadata store takes it: so a replica serves any manifest by digest while Redis
is down, and a Redis that lost its data has not lost a pushed manifest's bytes. While the
metadata store is unreachable, tag lookups answer from the last records this process saw
(served stale: the proxy cannot refresh them without it) and manifests from the object
store; writes fail with MetadataUnavailable, which the proxy logs as "not cached".
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from ..media import references
from .memory import Memory
from .metadata import Metadata, MetadataUnavailable, TagRecord

if TYPE_CHECKING:
    from .s3 import ObjectStore

log = logging.getLogger("mirror")

HOT_MANIFEST_BYTES = 32 << 20
# Short enough that what another process writes (mirror import) is seen soon.
HOT_TAG_SECONDS = 30
# Tag records kept to answer from while the metadata store is down.
LAST_TAGS = 10000
# Tags of upstream tag lists held parsed in memory, across all lists (least recently used go).
HOT_LIST_TAGS = 200_000


class Index:
    def __init__(self, metadata: Metadata, memory: Memory, remote: ObjectStore | None = None):
        self.metadata = metadata
        self.memory = memory
        self.remote = remote
        self._hot: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._hot_bytes = 0
        self._catalog: set[str] = set()  # names known to be in the catalog already
        self._last_tags: OrderedDict[str, TagRecord] = OrderedDict()
        # repository -> (tags, fetched_at, monotonic time read): see the module docstring.
        self._lists: OrderedDict[str, tuple[list[str], float, float]] = OrderedDict()
        self._list_tags = 0

    # Manifests, immutable by digest.
    async def manifest(self, digest: str) -> tuple[str, bytes] | None:
        found = self._hot.get(digest)
        if found is not None:
            self._hot.move_to_end(digest)
            return found
        try:
            found = await self.metadata.manifest(digest)
        except MetadataUnavailable:
            if self.remote is None:
                raise
            found = None
        if found is None and self.remote is not None:
            found = await self._stored_copy(digest)
        if found is not None:
            self._remember(digest, found)
        return found

    async def put_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        await self.keep_copy(digest, media_type, body)
        await self.metadata.put_manifest(digest, media_type, body, references(body))
        self._remember(digest, (media_type, body))

    async def keep_copy(self, digest: str, media_type: str, body: bytes) -> None:
        """With S3: the manifest's durable copy in the object store (written once)."""
        if self.remote is not None:
            await self.remote.put(_manifest_object(digest), media_type.encode() + b"\n" + body,
                                  if_none_match=True)

    async def _stored_copy(self, digest: str) -> tuple[str, bytes] | None:
        data = await self.remote.get(_manifest_object(digest))
        if data is None or b"\n" not in data:
            return None
        media_type, _, body = data.partition(b"\n")
        return media_type.decode(), body

    async def drop_manifest(self, digest: str) -> None:
        """Forget a manifest and every tag record that points to it (verify, eviction)."""
        tags = await self.metadata.tags_of(digest)
        await self.metadata.forget(digest)
        await self.forget_cached(digest, tags)

    async def forget_cached(self, digest: str, tags: list[tuple[str, str, str]]) -> None:
        """Drop the in-memory copies of a manifest and its tag records (already deleted)."""
        for repository, tag, accept_class in tags:
            self._last_tags.pop(_tag_key(repository, tag, accept_class), None)
            await self.memory.delete(_tag_key(repository, tag, accept_class))
        if (found := self._hot.pop(digest, None)) is not None:
            self._hot_bytes -= len(found[1])

    def remember(self, digest: str, media_type: str, body: bytes) -> None:
        """Hold a manifest just stored durably in the in-process tier."""
        self._remember(digest, (media_type, body))

    def _remember(self, digest: str, value: tuple[str, bytes]) -> None:
        if digest in self._hot:
            return
        self._hot[digest] = value
        self._hot_bytes += len(value[1])
        while self._hot_bytes > HOT_MANIFEST_BYTES:
            _, (_, body) = self._hot.popitem(last=False)
            self._hot_bytes -= len(body)

    # Tag records, one per repository, tag and Accept class.
    async def tag(self, repository: str, tag: str, accept_class: str) -> TagRecord | None:
        key = _tag_key(repository, tag, accept_class)
        record = await self.memory.get(key)
        if record is None:
            try:
                record = await self.metadata.tag(repository, tag, accept_class)
            except MetadataUnavailable:
                return self._last_tags.get(key)  # stale, or a miss the upstream answers
            if record is not None:
                await self.memory.set(key, record, ttl=HOT_TAG_SECONDS)
        self._last(key, record)
        return record

    def _last(self, key: str, record: TagRecord | None) -> None:
        if record is None:
            return
        self._last_tags[key] = record
        self._last_tags.move_to_end(key)
        if len(self._last_tags) > LAST_TAGS:
            self._last_tags.popitem(last=False)

    async def put_tag(self, repository: str, tag: str, accept_class: str,
                      record: TagRecord) -> None:
        key = _tag_key(repository, tag, accept_class)
        self._last(key, record)  # what the upstream just said: served while Redis is down
        await self.metadata.put_tag(repository, tag, accept_class, record)
        await self.memory.set(key, record, ttl=HOT_TAG_SECONDS)

    async def drop_tag(self, repository: str, tag: str, accept_class: str) -> None:
        self._last_tags.pop(_tag_key(repository, tag, accept_class), None)
        await self.metadata.drop_tag(repository, tag, accept_class)
        await self.memory.delete(_tag_key(repository, tag, accept_class))

    # Tag lists, as the upstream last sent them (sorted). The list is shared: not to be changed.
    async def tag_list(self, repository: str) -> tuple[list[str], float] | None:
        held = self._lists.get(repository)
        if held is not None and time.monotonic() - held[2] < HOT_TAG_SECONDS:
            self._lists.move_to_end(repository)
            return held[0], held[1]
        found = await self.metadata.tag_list(repository)
        if found is not None:
            self._hold_list(repository, found[0], found[1])
        return found

    async def put_tag_list(self, repository: str, tags: list[str]) -> None:
        await self.metadata.put_tag_list(repository, tags)
        self._hold_list(repository, tags, time.time())

    def _hold_list(self, repository: str, tags: list[str], fetched_at: float) -> None:
        if (old := self._lists.pop(repository, None)) is not None:
            self._list_tags -= len(old[0])
        self._lists[repository] = (tags, fetched_at, time.monotonic())
        self._list_tags += len(tags)
        while self._list_tags > HOT_LIST_TAGS and len(self._lists) > 1:
            _, (dropped, _, _) = self._lists.popitem(last=False)
            self._list_tags -= len(dropped)

    # The catalog: repository names as a client would pull them back.
    async def add_repository(self, name: str) -> None:
        if name not in self._catalog:  # one write per repository, not per manifest
            await self.metadata.add_repository(name)
            self._catalog.add(name)

    async def has_repository(self, name: str) -> bool:
        """Whether the cache holds content of `name` (as a client pulls it back). Names are
        only ever added to the catalog, so a yes is remembered: no query next time."""
        if name in self._catalog:
            return True
        if await self.metadata.has_repository(name):
            self._catalog.add(name)
            return True
        return False

    async def repository_names(self) -> list[str]:
        return await self.metadata.repository_names()

    async def catalog_page(self, after: str, limit: int) -> list[str]:
        """Up to `limit` catalog names after `after`, in order: one page, read through the
        store's index (not every name)."""
        return await self.metadata.catalog_page(after, limit)


def _manifest_object(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"manifests/{algorithm}/{encoded}"


def _tag_key(repository: str, tag: str, accept_class: str) -> str:
    return f"t:{repository}:{tag}:{accept_class}"
