"""Index: the metadata store (metadata.py) with its in-memory tier in front of it.

Manifests are also held in a small in-process LRU and tag records in the memory tier
(memory.py), so a warm manifest request does no database read at all. Everything durable
is in the `Metadata` backend; what is here is a copy that a restart simply re-reads.
Blobs are not here: they are files (blobs.py).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from ..media import references
from .memory import Memory
from .metadata import Metadata, TagRecord

log = logging.getLogger("mirror")

HOT_MANIFEST_BYTES = 32 << 20
# Short enough that what another process writes (mirror import) is seen soon.
HOT_TAG_SECONDS = 30


class Index:
    def __init__(self, metadata: Metadata, memory: Memory):
        self.metadata = metadata
        self.memory = memory
        self._hot: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._hot_bytes = 0
        self._catalog: set[str] = set()  # names known to be in the catalog already

    # Manifests, immutable by digest.
    async def manifest(self, digest: str) -> tuple[str, bytes] | None:
        found = self._hot.get(digest)
        if found is not None:
            self._hot.move_to_end(digest)
            return found
        found = await self.metadata.manifest(digest)
        if found is not None:
            self._remember(digest, found)
        return found

    async def put_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        await self.metadata.put_manifest(digest, media_type, body, references(body))
        self._remember(digest, (media_type, body))

    async def drop_manifest(self, digest: str) -> None:
        """Forget a manifest and every tag record that points to it (verify, eviction)."""
        tags = await self.metadata.tags_of(digest)
        await self.metadata.forget(digest)
        await self.forget_cached(digest, tags)

    async def forget_cached(self, digest: str, tags: list[tuple[str, str, str]]) -> None:
        """Drop the in-memory copies of a manifest and its tag records (already deleted)."""
        for repository, tag, accept_class in tags:
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
            record = await self.metadata.tag(repository, tag, accept_class)
            if record is not None:
                await self.memory.set(key, record, ttl=HOT_TAG_SECONDS)
        return record

    async def put_tag(self, repository: str, tag: str, accept_class: str,
                      record: TagRecord) -> None:
        await self.metadata.put_tag(repository, tag, accept_class, record)
        await self.memory.set(_tag_key(repository, tag, accept_class), record,
                              ttl=HOT_TAG_SECONDS)

    async def drop_tag(self, repository: str, tag: str, accept_class: str) -> None:
        await self.metadata.drop_tag(repository, tag, accept_class)
        await self.memory.delete(_tag_key(repository, tag, accept_class))

    # Tag lists, as the upstream last sent them.
    async def tag_list(self, repository: str) -> tuple[list[str], float] | None:
        return await self.metadata.tag_list(repository)

    async def put_tag_list(self, repository: str, tags: list[str]) -> None:
        await self.metadata.put_tag_list(repository, tags)

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


def _tag_key(repository: str, tag: str, accept_class: str) -> str:
    return f"t:{repository}:{tag}:{accept_class}"
