"""Metadata: the one interface to everything the mirror knows besides blob bytes.

Manifests by digest, tag records (what a tag answered, per Accept class, and when it was
last confirmed), upstream tag lists, the catalog, hosted repositories (their tags,
manifests, blobs and referrers) and the usage ledger (sizes, last use, pins, references)
all sit behind `Metadata`. Every method is a coroutine and every write is one explicit
transaction, so a caller never holds a database handle and a second, shared backend
(Redis, for several replicas) can implement the same methods. Nothing here is ever culled
to make room: the only deletions are the ones a caller asks for (eviction, DELETE, verify).

Eviction is one decision per item (`evict`): whether the item may go is checked again in
the same transaction that removes it, against what is true *then* — its last use, a pin,
a hosted repository or a kept manifest referring to it, open readers — not against a
snapshot taken when the eviction pass began.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..errors import StorageError


class MetadataBroken(StorageError):
    """The metadata store failed for another reason (a corrupt or unreadable database)."""


class MetadataUnavailable(StorageError):
    """The shared metadata store (Redis) does not answer: a 503 the client may retry.
    Pulls by digest go on without it (storage/index.py), and what was fetched is served
    without being kept."""

    code, status = "UNAVAILABLE", 503

    def __init__(self, message: str, detail: object = None, headers: dict | None = None):
        super().__init__(message, detail, headers or {"Retry-After": "5"})


@dataclass(frozen=True)
class TagRecord:
    digest: str
    media_type: str
    size: int
    checked_at: float  # wall-clock time of the last upstream confirmation

    def fresh(self, ttl: float) -> bool:
        return time.time() - self.checked_at < ttl


@dataclass(frozen=True)
class Item:
    """One entry of the usage ledger: a stored blob or manifest."""

    digest: str
    kind: str  # "blob" | "manifest"
    size: int
    atime: float
    pinned: bool


@dataclass(frozen=True)
class Evicted:
    """What one eviction removed: the item, and the children it alone may have kept."""

    item: Item
    children: list[str]
    tags: list[tuple[str, str, str]]  # the tag records that went with a manifest


@dataclass
class HostedRepository:
    """A hosted repository's contents: tags → digest, manifests → media type, blobs → size."""

    name: str
    tags: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, str] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ManifestPush:
    """A validated pushed manifest, to be stored in one transaction with its links."""

    name: str
    digest: str
    media_type: str
    body: bytes
    refs: list[str]                 # what it refers to (blobs, or an index's manifests)
    blobs: dict[str, int]           # blobs to link into the repository (digest → size)
    tags: list[str]
    subject: str | None = None
    descriptor: dict | None = None  # its descriptor in the subject's referrers list


class Metadata(abc.ABC):
    """What `cache/`, `api/` and `ops/` may ask of the metadata store."""

    # Manifests, immutable by digest.
    @abc.abstractmethod
    async def manifest(self, digest: str) -> tuple[str, bytes] | None: ...

    @abc.abstractmethod
    async def put_manifest(self, digest: str, media_type: str, body: bytes,
                           refs: Iterable[str]) -> None:
        """Store a manifest and enter it in the ledger with what it refers to."""

    @abc.abstractmethod
    async def manifest_digests(self) -> list[str]: ...

    # Tag records, per repository key (`docker.io/library/alpine`), tag and Accept class.
    @abc.abstractmethod
    async def tag(self, repository: str, tag: str, accept_class: str) -> TagRecord | None: ...

    @abc.abstractmethod
    async def put_tag(self, repository: str, tag: str, accept_class: str,
                      record: TagRecord) -> None: ...

    @abc.abstractmethod
    async def drop_tag(self, repository: str, tag: str, accept_class: str) -> None: ...

    @abc.abstractmethod
    async def tag_records(self) -> list[tuple[str, str, str, TagRecord]]:
        """Every (repository, tag, accept class, record), for `mirror ls`."""

    @abc.abstractmethod
    async def tags_of(self, digest: str) -> list[tuple[str, str, str]]:
        """The (repository, tag, accept class) of every tag record pointing at `digest`."""

    # Upstream tag lists.
    @abc.abstractmethod
    async def tag_list(self, repository: str) -> tuple[list[str], float] | None: ...

    @abc.abstractmethod
    async def put_tag_list(self, repository: str, tags: list[str]) -> None: ...

    # The catalog of cached repositories, by the name a client pulls them back with.
    @abc.abstractmethod
    async def add_repository(self, name: str) -> None: ...

    @abc.abstractmethod
    async def repository_names(self) -> list[str]: ...

    @abc.abstractmethod
    async def has_repository(self, name: str) -> bool: ...

    # Hosted repositories.
    @abc.abstractmethod
    async def hosted_names(self) -> list[str]: ...

    async def is_hosted(self, name: str) -> bool:
        """Whether `name` is a hosted repository (a backend may answer with one lookup)."""
        return name in await self.hosted_names()

    @abc.abstractmethod
    async def hosted(self, name: str) -> HostedRepository | None: ...

    @abc.abstractmethod
    async def hosted_blob(self, name: str, digest: str) -> int | None:
        """The size of a blob linked into hosted repository `name`, or None."""

    @abc.abstractmethod
    async def hosted_manifest(self, name: str, reference: str) -> str | None:
        """The digest a hosted repository's tag or digest reference names, or None.
        (One row read: a pull must not load a repository's every tag.)"""

    @abc.abstractmethod
    async def link_blob(self, name: str, digest: str,
                        exists: Callable[[str], int | None]) -> int | None:
        """Link a stored blob into a hosted repository (push-to-create); its size, or None
        when `exists(digest)` finds no such blob at the moment of linking (a mount of a
        blob that eviction just took)."""

    @abc.abstractmethod
    async def push_manifest(self, push: ManifestPush,
                            exists: Callable[[str], int | None]) -> None:
        """Store a pushed manifest, its blob links, tags and referrer entry at once."""

    @abc.abstractmethod
    async def delete_hosted_tag(self, name: str, tag: str) -> bool: ...

    @abc.abstractmethod
    async def delete_hosted_manifest(self, name: str, digest: str) -> bool: ...

    @abc.abstractmethod
    async def delete_hosted_blob(self, name: str, digest: str) -> bool: ...

    @abc.abstractmethod
    async def referrers(self, name: str, subject: str) -> list[dict]: ...

    @abc.abstractmethod
    async def held_by_hosted(self) -> set[str]:
        """Every digest a hosted repository holds (gc keeps them)."""

    # The usage ledger.
    @abc.abstractmethod
    def record_blob(self, digest: str, size: int, atime: float | None = None) -> None:
        """Enter a committed blob. Queued, not awaited: a commit must not wait on SQLite,
        and the queue is ordered, so every later call sees it."""

    @abc.abstractmethod
    def touch(self, digest: str) -> None:
        """A hit: refresh the item's clock in memory (written by `flush`)."""

    @abc.abstractmethod
    async def flush(self) -> None: ...

    @abc.abstractmethod
    async def item(self, digest: str) -> Item | None: ...

    @abc.abstractmethod
    async def items(self) -> list[Item]: ...

    @abc.abstractmethod
    async def oldest(self, before: float, after: tuple[float, str] = (0.0, ""),
                     limit: int = 500) -> list[Item]:
        """Up to `limit` items last used before `before`, oldest first, after the
        (atime, digest) position `after` (a page of the ledger through its index)."""

    @abc.abstractmethod
    async def parents(self, digest: str) -> list[str]: ...

    @abc.abstractmethod
    async def children(self, digest: str) -> list[str]: ...

    @abc.abstractmethod
    async def pin(self, digest: str, pinned: bool = True) -> bool: ...

    @abc.abstractmethod
    async def pinned_closure(self) -> set[str]: ...

    @abc.abstractmethod
    async def forget(self, digest: str) -> None:
        """Remove an item from the ledger (and a manifest with its tag records)."""

    @abc.abstractmethod
    async def evict(self, digest: str, cutoff: float, in_use: Callable[[str], bool],
                    remove_file: Callable[[str], None],
                    linked_before: float = 0.0) -> Evicted | None:
        """Evict one item if, checked now and atomically with its removal, it is unpinned,
        unused since `cutoff`, not `in_use`, referred to by no kept manifest, not a hosted
        manifest, and linked into no hosted repository since `linked_before` (a pushed blob
        no manifest refers to yet); a manifest goes with its tag records. None when it
        stays."""

    @abc.abstractmethod
    def total(self) -> int:
        """Bytes the ledger holds (a running sum, refreshed by `refresh_total`)."""

    @abc.abstractmethod
    async def refresh_total(self) -> int: ...

    @abc.abstractmethod
    async def check(self) -> None:
        """Raise unless the store answers a read (readiness)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # Pages of names and one page's tag records, for the cache view (api/browse.py) and
    # `mirror ls` (ops/inventory.py). These defaults read every name, which any backend can;
    # a backend with an ordered index (sqlite.py) reads only the page.
    async def catalog_page(self, after: str, limit: int, contains: str = "") -> list[str]:
        """Up to `limit` catalog names after `after` (exclusive), in order, that hold
        `contains`."""
        return _page(await self.repository_names(), after, limit, contains)

    async def hosted_page(self, after: str, limit: int, contains: str = "") -> list[str]:
        """Up to `limit` hosted repository names after `after`, in order, holding `contains`."""
        return _page(await self.hosted_names(), after, limit, contains)

    async def hosted_tags_page(self, name: str, after: str, limit: int) -> list[str]:
        """Up to `limit` tags of hosted repository `name` after `after`, in order (a
        `tags/list?n=` page reads only the page)."""
        repository = await self.hosted(name)
        return _page(repository.tags if repository else [], after, limit, "")

    async def tagged_page(self, prefix: str, after: str, limit: int, contains: str = "",
                          exclude: str | None = None) -> list[str]:
        """Up to `limit` repository keys of tag records that start with `prefix` and not with
        `exclude`, each without `prefix`, in order, after `after` and holding `contains`
        (both said without `prefix`): `docker.io/` gives the default upstream's names as its
        clients pull them."""
        keys = {record[0] for record in await self.tag_records()}
        return _page([key[len(prefix):] for key in keys if key.startswith(prefix) and
                      not (exclude and key.startswith(exclude))], after, limit, contains)

    async def repository_tags(self, repositories: Iterable[str]
                              ) -> dict[str, list[tuple[str, str, TagRecord]]]:
        """The (tag, accept class, record) of each of these repository keys, in order: one
        page's tag records, never every repository's."""
        wanted = set(repositories)
        found: dict[str, list[tuple[str, str, TagRecord]]] = {key: [] for key in wanted}
        for repository, tag, accept_class, record in await self.tag_records():
            if repository in wanted:
                found[repository].append((tag, accept_class, record))
        return found

    async def ledger_entries(self, digests: Iterable[str]) -> dict[str, tuple[Item, list[str]]]:
        """The item and children of each of these digests the ledger holds: a page's
        content in one read, not two per digest."""
        found = {}
        for digest in set(digests):
            if (item := await self.item(digest)) is not None:
                found[digest] = (item, await self.children(digest))
        return found

    async def manifests_of(self, digests: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        """(media type, bytes) of each of these manifests that is stored."""
        found = {}
        for digest in set(digests):
            if (manifest := await self.manifest(digest)) is not None:
                found[digest] = manifest
        return found


def _page(names: Iterable[str], after: str, limit: int, contains: str) -> list[str]:
    """The page of `names` a `*_page` call answers, from every name."""
    return sorted(n for n in names if n > after and contains in n)[:limit]
