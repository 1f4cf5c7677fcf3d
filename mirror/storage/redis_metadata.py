"""RedisMetadata: the metadata store in Redis, shared by several replicas of the mirror.

It answers exactly as SqliteMetadata (sqlite.py) does; every key is under the prefix
(`mirror:` by default; `<d>` a digest, `<id>` is `<repository>:<tag>:<accept class>`):

    cluster                       string  random id of this store (redis_store.py)
    manifest:<d>                  hash    media_type, body           manifests by digest
    manifests                     set     every manifest digest
    tag:<id>                      hash    digest, media_type, size, checked_at  tag records
    tags                          set     every <id>
    tags_of:<d>                   set     the <id>s pointing at <d>
    tag_list:<repository>         hash    tags (JSON), fetched_at    upstream tag lists
    catalog                       hash    name → added               cached repositories
    hosted                        hash    name → created             hosted repositories
    hosted:<name>:tags            hash    tag → digest
    hosted:<name>:manifests       hash    digest → media_type
    hosted:<name>:blobs           hash    digest → size
    hosted:<name>:subjects        hash    digest → subject           (to delete its referrer)
    hosted:<name>:referrers:<d>   hash    digest → descriptor JSON   the referrers of <d>
    hosted_in:<d>                 set     names holding manifest <d> as a hosted manifest
    links:<d>                     hash    name → linked_at           hosted links of blob <d>
    item:<d>, atime, total, pinned, children:<d>, parents:<d>        the usage ledger
                                                                     (redis_ledger.py)

Every write that touches several keys is one MULTI/EXEC. Where a read decides the write
(the digest a tag record pointed at before, whether a blob is stored) the keys read are
WATCHed and the write is dropped and decided again if another replica changed them
(RedisStore._atomic): those decisions call back into Python (`exists` reads a local disk),
which a Lua script cannot. In a cluster the ledger is the authority on which blobs are
stored (a commit is entered before anything is answered from it), so a blob counts as
stored when the ledger holds it, and only otherwise when `exists` finds it on this disk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

from redis.asyncio.client import Pipeline

from ..errors import ManifestBlobUnknown
from .metadata import (
    HostedRepository,
    Item,
    ManifestPush,
    Metadata,
    MetadataUnavailable,
    TagRecord,
)
from .redis_ledger import RedisLedger
from .redis_store import MetadataLost, guarded, split_tag_id, tag_id, text

__all__ = ["MetadataLost", "MetadataUnavailable", "RedisMetadata"]


def _record(fields: dict) -> TagRecord | None:
    if not fields:
        return None
    row = {text(k): text(v) for k, v in fields.items()}
    return TagRecord(row["digest"], row["media_type"], int(row["size"]),
                     float(row["checked_at"]))


class RedisMetadata(RedisLedger, Metadata):
    # Manifests.
    @guarded
    async def manifest(self, digest: str) -> tuple[str, bytes] | None:
        media_type, body = await self.client.hmget(self.key("manifest", digest),
                                                   "media_type", "body")
        if body is None:
            return None
        return text(media_type), body if isinstance(body, bytes) else body.encode()

    def _store_manifest(self, pipe: Pipeline, digest: str, media_type: str,
                        body: bytes) -> None:
        manifest = self.key("manifest", digest)
        pipe.hsetnx(manifest, "media_type", media_type)  # immutable: the first one stays
        pipe.hsetnx(manifest, "body", body)
        pipe.sadd(self.key("manifests"), digest)

    @guarded
    async def put_manifest(self, digest: str, media_type: str, body: bytes,
                           refs: Iterable[str]) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            self._store_manifest(pipe, digest, media_type, body)
            await self._enter(pipe, digest, "manifest", len(body), time.time(), refs)
            self._total = int((await pipe.execute())[-1])

    @guarded
    async def manifest_digests(self) -> list[str]:
        return sorted(text(d) for d in await self.client.smembers(self.key("manifests")))

    # Tag records.
    @guarded
    async def tag(self, repository: str, tag: str, accept_class: str) -> TagRecord | None:
        return _record(await self.client.hgetall(
            self.key("tag", tag_id(repository, tag, accept_class))))

    @guarded
    async def put_tag(self, repository: str, tag: str, accept_class: str,
                      record: TagRecord) -> None:
        await self._write_tag(tag_id(repository, tag, accept_class), record)

    @guarded
    async def drop_tag(self, repository: str, tag: str, accept_class: str) -> None:
        await self._write_tag(tag_id(repository, tag, accept_class), None)

    async def _write_tag(self, id_: str, record: TagRecord | None) -> None:
        """Set or drop a tag record, moving it in the by-digest index (`tags_of`)."""
        key = self.key("tag", id_)

        async def decide(pipe: Pipeline) -> None:
            before = await pipe.hget(key, "digest")
            pipe.multi()
            if before is not None and (record is None or text(before) != record.digest):
                pipe.srem(self.key("tags_of", text(before)), id_)
            if record is None:
                pipe.delete(key)
                pipe.srem(self.key("tags"), id_)
                return
            pipe.hset(key, mapping={"digest": record.digest, "media_type": record.media_type,
                                    "size": record.size, "checked_at": record.checked_at})
            pipe.sadd(self.key("tags"), id_)
            pipe.sadd(self.key("tags_of", record.digest), id_)
        await self._atomic([key], decide)

    @guarded
    async def tag_records(self) -> list[tuple[str, str, str, TagRecord]]:
        ids = sorted(text(i) for i in await self.client.smembers(self.key("tags")))
        async with self.client.pipeline(transaction=True) as pipe:
            for id_ in ids:
                pipe.hgetall(self.key("tag", id_))
            rows = await pipe.execute()
        found = [(*split_tag_id(id_), _record(row)) for id_, row in zip(ids, rows)]
        return sorted((r for r in found if r[3] is not None), key=lambda r: r[:3])

    @guarded
    async def tags_of(self, digest: str) -> list[tuple[str, str, str]]:
        return sorted(split_tag_id(text(i)) for i in
                      await self.client.smembers(self.key("tags_of", digest)))

    # Tag lists.
    @guarded
    async def tag_list(self, repository: str) -> tuple[list[str], float] | None:
        tags, fetched_at = await self.client.hmget(self.key("tag_list", repository),
                                                   "tags", "fetched_at")
        return (json.loads(tags), float(fetched_at)) if tags is not None else None

    @guarded
    async def put_tag_list(self, repository: str, tags: list[str]) -> None:
        await self.client.hset(self.key("tag_list", repository),
                               mapping={"tags": json.dumps(tags), "fetched_at": time.time()})

    # The catalog.
    @guarded
    async def add_repository(self, name: str) -> None:
        await self.client.hsetnx(self.key("catalog"), name, time.time())

    @guarded
    async def repository_names(self) -> list[str]:
        return sorted(text(n) for n in await self.client.hkeys(self.key("catalog")))

    @guarded
    async def has_repository(self, name: str) -> bool:
        return bool(await self.client.hexists(self.key("catalog"), name))

    # Hosted repositories.
    @guarded
    async def hosted_names(self) -> list[str]:
        return sorted(text(n) for n in await self.client.hkeys(self.key("hosted")))

    @guarded
    async def is_hosted(self, name: str) -> bool:
        return bool(await self.client.hexists(self.key("hosted"), name))

    @guarded
    async def hosted(self, name: str) -> HostedRepository | None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hexists(self.key("hosted"), name)
            for part in ("tags", "manifests", "blobs"):
                pipe.hgetall(self.key("hosted", name, part))
            exists, tags, manifests, blobs = await pipe.execute()
        if not exists:
            return None
        return HostedRepository(
            name, {text(t): text(d) for t, d in tags.items()},
            {text(d): text(m) for d, m in manifests.items()},
            {text(d): int(s) for d, s in blobs.items()})

    @guarded
    async def hosted_blob(self, name: str, digest: str) -> int | None:
        size = await self.client.hget(self.key("hosted", name, "blobs"), digest)
        return int(size) if size is not None else None

    @guarded
    async def hosted_manifest(self, name: str, reference: str) -> str | None:
        digest: str | None = reference
        if ":" not in reference:  # a tag (tags hold no colon): only if its manifest is there
            found = await self.client.hget(self.key("hosted", name, "tags"), reference)
            digest = text(found) if found is not None else None
        if digest is None:
            return None
        if not await self.client.hexists(self.key("hosted", name, "manifests"), digest):
            return None
        return digest

    async def _stored(self, pipe: Pipeline, digest: str,
                      exists: Callable[[str], int | None]) -> int | None:
        """A blob's size if it is stored: from the ledger (watched by the caller), else
        from this disk; never one this replica is evicting."""
        kind, size = await pipe.hmget(self.key("item", digest), "kind", "size")
        if kind is not None and text(kind) == "blob":
            return int(size)
        if digest in self._removing:
            return None
        return exists(digest)

    def _link(self, pipe: Pipeline, name: str, blobs: dict[str, int], now: float) -> None:
        pipe.hsetnx(self.key("hosted"), name, now)
        if blobs:
            pipe.hset(self.key("hosted", name, "blobs"), mapping=blobs)
        for digest in blobs:
            pipe.hset(self.key("links", digest), name, now)

    @guarded
    async def link_blob(self, name: str, digest: str,
                        exists: Callable[[str], int | None]) -> int | None:
        # The ledger item is watched: an eviction that takes the blob between this check
        # and the link makes EXEC fail, and the check runs again (and finds it gone).
        async def decide(pipe: Pipeline) -> int | None:
            size = await self._stored(pipe, digest, exists)
            if size is None:
                return None
            pipe.multi()
            self._link(pipe, name, {digest: size}, time.time())
            return size
        return (await self._atomic([self.key("item", digest)], decide))[0]

    @guarded
    async def push_manifest(self, push: ManifestPush,
                            exists: Callable[[str], int | None]) -> None:
        async def decide(pipe: Pipeline) -> None:
            for digest in push.blobs:
                if await self._stored(pipe, digest, exists) is None:
                    raise ManifestBlobUnknown(f"blob {digest} is not in {push.name}; "
                                              "push it first")
            now = time.time()
            pipe.multi()
            self._link(pipe, push.name, push.blobs, now)
            self._store_manifest(pipe, push.digest, push.media_type, push.body)
            pipe.hset(self.key("hosted", push.name, "manifests"), push.digest, push.media_type)
            pipe.sadd(self.key("hosted_in", push.digest), push.name)
            if push.tags:
                pipe.hset(self.key("hosted", push.name, "tags"),
                          mapping={tag: push.digest for tag in push.tags})
            if push.subject is not None and push.descriptor is not None:
                pipe.hset(self.key("hosted", push.name, "referrers", push.subject),
                          push.digest, json.dumps(push.descriptor))
                pipe.hset(self.key("hosted", push.name, "subjects"), push.digest, push.subject)
            await self._enter(pipe, push.digest, "manifest", len(push.body), now, push.refs)
        _, results = await self._atomic([self.key("item", d) for d in push.blobs], decide)
        self._total = int(results[-1])

    @guarded
    async def delete_hosted_tag(self, name: str, tag: str) -> bool:
        return await self.client.hdel(self.key("hosted", name, "tags"), tag) > 0

    @guarded
    async def delete_hosted_manifest(self, name: str, digest: str) -> bool:
        manifests, tags, subjects = (self.key("hosted", name, part)
                                     for part in ("manifests", "tags", "subjects"))
        hosted_in = self.key("hosted_in", digest)

        async def decide(pipe: Pipeline) -> tuple[bool, bool]:
            if not await pipe.hexists(manifests, digest):
                return False, False
            tagged = [t for t, d in (await pipe.hgetall(tags)).items() if text(d) == digest]
            subject = await pipe.hget(subjects, digest)
            item, children, tag_records = await self._read_removal(pipe, digest)
            # Nothing else wants it (another repository, a cached tag, an index, a pin): it
            # goes now, so what only it referred to becomes free to go.
            others = {text(n) for n in await pipe.smembers(hosted_in)} - {name}
            referred = await pipe.scard(self.key("parents", digest))
            wanted = bool(others or tag_records or referred or (item and item.pinned))
            pipe.multi()
            pipe.hdel(manifests, digest)
            pipe.srem(hosted_in, name)
            if tagged:
                pipe.hdel(tags, *tagged)
            if subject is not None:
                pipe.hdel(self.key("hosted", name, "referrers", text(subject)), digest)
                pipe.hdel(subjects, digest)
            if not wanted:
                self._remove(pipe, digest, item, children, tag_records)
            return True, not wanted

        watched = [manifests, tags, subjects, hosted_in, self.key("parents", digest),
                   *self._removal_keys(digest)]
        (deleted, removed), results = await self._atomic(watched, decide)
        if removed:
            self._total = int(results[-1])
        return deleted

    @guarded
    async def delete_hosted_blob(self, name: str, digest: str) -> bool:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.key("hosted", name, "blobs"), digest)
            pipe.hdel(self.key("links", digest), name)
            deleted, _ = await pipe.execute()
        return deleted > 0

    @guarded
    async def referrers(self, name: str, subject: str) -> list[dict]:
        found = await self.client.hgetall(self.key("hosted", name, "referrers", subject))
        return [json.loads(found[d]) for d in sorted(found)]

    @guarded
    async def held_by_hosted(self) -> set[str]:
        names = [text(n) for n in await self.client.hkeys(self.key("hosted"))]
        async with self.client.pipeline(transaction=True) as pipe:
            for name in names:
                pipe.hkeys(self.key("hosted", name, "blobs"))
                pipe.hkeys(self.key("hosted", name, "manifests"))
            held = await pipe.execute()
        return {text(d) for digests in held for d in digests}

    # Pages for the cache view. The catalog, hosted names and tag ids are unordered here
    # (a hash, a hash, a set), so a page reads every name or id, but never a record it does
    # not show: only the ids, then one page's tag records.
    async def _tag_ids(self) -> list[tuple[str, str, str]]:
        return [split_tag_id(text(i)) for i in await self.client.smembers(self.key("tags"))]

    @guarded
    async def tagged_page(self, prefix: str, after: str, limit: int, contains: str = "",
                          exclude: str | None = None) -> list[str]:
        keys = {repository for repository, _, _ in await self._tag_ids()}
        names = {key[len(prefix):] for key in keys if key.startswith(prefix) and
                 not (exclude and key.startswith(exclude))}
        return sorted(n for n in names if n > after and contains in n)[:limit]

    @guarded
    async def repository_tags(self, repositories: Iterable[str]
                              ) -> dict[str, list[tuple[str, str, TagRecord]]]:
        wanted = set(repositories)
        ids = sorted(i for i in await self._tag_ids() if i[0] in wanted)
        async with self.client.pipeline(transaction=True) as pipe:
            for id_ in ids:
                pipe.hgetall(self.key("tag", tag_id(*id_)))
            rows = await pipe.execute() if ids else []
        found: dict[str, list[tuple[str, str, TagRecord]]] = {key: [] for key in wanted}
        for (repository, tag, accept_class), row in zip(ids, rows, strict=True):
            record = _record(row)
            if record is not None:  # dropped since the ids were read
                found[repository].append((tag, accept_class, record))
        return found

    @guarded
    async def ledger_entries(self, digests: Iterable[str]) -> dict[str, tuple[Item, list[str]]]:
        wanted = sorted(set(digests))
        async with self.client.pipeline(transaction=True) as pipe:
            for digest in wanted:
                pipe.hgetall(self.key("item", digest))
                pipe.smembers(self.key("children", digest))
            rows = await pipe.execute() if wanted else []
        found = {}
        for digest, fields, children in zip(wanted, rows[::2], rows[1::2], strict=True):
            if (item := self._item(digest, fields)) is not None:
                found[digest] = (item, sorted(text(c) for c in children))
        return found

    @guarded
    async def manifests_of(self, digests: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        wanted = sorted(set(digests))
        async with self.client.pipeline(transaction=True) as pipe:
            for digest in wanted:
                pipe.hmget(self.key("manifest", digest), "media_type", "body")
            rows = await pipe.execute() if wanted else []
        return {digest: (text(media_type), body if isinstance(body, bytes) else body.encode())
                for digest, (media_type, body) in zip(wanted, rows, strict=True)
                if body is not None}
