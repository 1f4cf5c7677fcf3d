"""The metadata index (diskcache): manifests by digest, tag records, tag lists, repositories.

    <root>/index/    a diskcache directory (SQLite + value files), durable across restarts

    m:<digest>                        → (media_type, manifest bytes exactly as the upstream sent)
    t:<upstream>/<name>:<tag>:<class> → TagRecord: what the tag answered for one Accept class
    l:<upstream>/<name>               → (tags, fetched_at): the upstream's full tag list
    catalog (a second cache)          → one key per repository the cache holds, for _catalog

Manifests are also held in a small in-process LRU and tag records in the memory tier, so a
warm manifest request does no disk read at all. Blobs are not here: they are files (blobs.py).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import diskcache

from ..media import references
from .memory import Memory
from .usage import Usage

log = logging.getLogger("mirror")

HOT_MANIFEST_BYTES = 32 << 20
# Short enough that what another process writes (mirror import) is seen soon.
HOT_TAG_SECONDS = 30


@dataclass(frozen=True)
class TagRecord:
    digest: str
    media_type: str
    size: int
    checked_at: float  # wall-clock time of the last upstream confirmation

    def fresh(self, ttl: float) -> bool:
        return time.time() - self.checked_at < ttl


class Index:
    def __init__(self, root: str | Path, memory: Memory, usage: Usage):
        self.db = diskcache.Cache(str(Path(root) / "index"))
        self.repositories = diskcache.Cache(str(Path(root) / "index" / "catalog"))
        self.memory = memory
        self.usage = usage
        self._hot: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._hot_bytes = 0

    def close(self) -> None:
        self.db.close()
        self.repositories.close()

    # Manifests, immutable by digest.
    def manifest(self, digest: str) -> tuple[str, bytes] | None:
        found = self._hot.get(digest)
        if found is not None:
            self._hot.move_to_end(digest)
            return found
        found = self.db.get(f"m:{digest}")
        if found is not None:
            self._remember(digest, found)
        return found

    def put_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        self._set(f"m:{digest}", (media_type, body))
        self._remember(digest, (media_type, body))
        self.usage.add(digest, "manifest", len(body), references(body))

    async def drop_manifest(self, digest: str) -> None:
        """Forget a manifest and every tag record that points to it (eviction)."""
        for key in self.usage.tags_of(digest):
            self.db.delete(key)
            await self.memory.delete(key)
        self.db.delete(f"m:{digest}")
        if (found := self._hot.pop(digest, None)) is not None:
            self._hot_bytes -= len(found[1])
        self.usage.remove(digest)

    def _set(self, key: str, value: object) -> None:
        """Store durably if the disk lets us; a full disk must not fail the client's request."""
        try:
            self.db.set(key, value)
        except (OSError, sqlite3.Error) as e:
            log.error("cannot store %s in the index: %s", key.partition(":")[2] or key, e)

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
        key = f"t:{repository}:{tag}:{accept_class}"
        record = await self.memory.get(key)
        if record is None:
            record = self.db.get(key)
            if record is not None:
                await self.memory.set(key, record, ttl=HOT_TAG_SECONDS)
        return record

    async def put_tag(self, repository: str, tag: str, accept_class: str,
                      record: TagRecord) -> None:
        key = f"t:{repository}:{tag}:{accept_class}"
        self._set(key, record)
        await self.memory.set(key, record, ttl=HOT_TAG_SECONDS)
        self.usage.tag(key, record.digest)

    async def drop_tag(self, repository: str, tag: str, accept_class: str) -> None:
        key = f"t:{repository}:{tag}:{accept_class}"
        self.db.delete(key)
        await self.memory.delete(key)
        self.usage.untag(key)

    # Tag lists, as the upstream last sent them.
    def tag_list(self, repository: str) -> tuple[list[str], float] | None:
        return self.db.get(f"l:{repository}")

    def put_tag_list(self, repository: str, tags: list[str]) -> None:
        self._set(f"l:{repository}", (tags, time.time()))

    # The catalog: repository names as a client would pull them back.
    def add_repository(self, name: str) -> None:
        if name not in self.repositories:
            try:
                self.repositories.set(name, time.time())
            except (OSError, sqlite3.Error) as e:
                log.error("cannot add %s to the catalog: %s", name, e)

    async def has_repository(self, name: str) -> bool:
        """Whether the cache holds content of `name` (as a client pulls it back)."""
        return name in self.repositories

    def repository_names(self) -> list[str]:
        return sorted(self.repositories.iterkeys())
