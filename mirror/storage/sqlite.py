"""SqliteMetadata: the metadata store on one node, in one SQLite database.

    <root>/metadata.sqlite   (WAL)
      manifests(digest → media_type, body)                 manifests by digest
      tags(repository, tag, accept_class → digest, media_type, size, checked_at)
      tag_lists(repository → tags JSON, fetched_at)        upstream tag lists
      catalog(name → added)                                cached repositories, as pulled
      items, refs                                          the usage ledger (ledger.py)
      hosted_repositories(name), hosted_tags(name, tag → digest),
      hosted_manifests(name, digest → media_type), hosted_blobs(name, digest → size, linked_at),
      referrers(name, subject, digest → descriptor JSON)   hosted repositories
      meta(key → value)

It runs on database.py's thread and transactions. SQLite never culls: unlike the diskcache
this replaces (whose default 1 GiB size limit silently deleted the oldest keys, pushed
manifests among them), rows go only when a caller deletes them. A storage root from before
this database is copied in once at the first open (migration.py).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Callable, Iterable

from ..errors import ManifestBlobUnknown
from .ledger import ITEM_COLUMNS, Ledger
from .metadata import HostedRepository, Item, ManifestPush, Metadata, TagRecord


class SqliteMetadata(Ledger, Metadata):
    # Manifests.
    async def manifest(self, digest: str) -> tuple[str, bytes] | None:
        row = await self._run(self._one, "SELECT media_type, body FROM manifests "
                              "WHERE digest = ?", digest)
        return (row[0], bytes(row[1])) if row is not None else None

    async def put_manifest(self, digest: str, media_type: str, body: bytes,
                           refs: Iterable[str]) -> None:
        def put() -> None:
            with self._tx() as db:
                db.execute("INSERT OR IGNORE INTO manifests (digest, media_type, body) "
                           "VALUES (?, ?, ?)", (digest, media_type, body))
                self._add_item(db, digest, "manifest", len(body), list(refs), None)
        await self._run(put)

    async def manifest_digests(self) -> list[str]:
        return await self._run(self._column, "SELECT digest FROM manifests")

    # Tag records.
    async def tag(self, repository: str, tag: str, accept_class: str) -> TagRecord | None:
        row = await self._run(self._one, "SELECT digest, media_type, size, checked_at FROM tags "
                              "WHERE repository = ? AND tag = ? AND accept_class = ?",
                              repository, tag, accept_class)
        return TagRecord(*row) if row is not None else None

    async def put_tag(self, repository: str, tag: str, accept_class: str,
                      record: TagRecord) -> None:
        def put() -> None:
            with self._tx() as db:
                db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (repository, tag, accept_class, record.digest, record.media_type,
                            record.size, record.checked_at))
        await self._run(put)

    async def drop_tag(self, repository: str, tag: str, accept_class: str) -> None:
        def drop() -> None:
            with self._tx() as db:
                db.execute("DELETE FROM tags WHERE repository = ? AND tag = ? AND "
                           "accept_class = ?", (repository, tag, accept_class))
        await self._run(drop)

    async def tag_records(self) -> list[tuple[str, str, str, TagRecord]]:
        def read() -> list:
            return [(r[0], r[1], r[2], TagRecord(*r[3:])) for r in self._db.execute(
                "SELECT repository, tag, accept_class, digest, media_type, size, checked_at "
                "FROM tags ORDER BY repository, tag, accept_class")]
        return await self._run(read)

    async def tags_of(self, digest: str) -> list[tuple[str, str, str]]:
        def read() -> list:
            return [tuple(r) for r in self._db.execute(
                "SELECT repository, tag, accept_class FROM tags WHERE digest = ? "
                "ORDER BY repository, tag, accept_class", (digest,))]
        return await self._run(read)

    # Tag lists.
    async def tag_list(self, repository: str) -> tuple[list[str], float] | None:
        row = await self._run(self._one, "SELECT tags, fetched_at FROM tag_lists "
                              "WHERE repository = ?", repository)
        return (json.loads(row[0]), row[1]) if row is not None else None

    async def put_tag_list(self, repository: str, tags: list[str]) -> None:
        def put() -> None:
            with self._tx() as db:
                db.execute("INSERT OR REPLACE INTO tag_lists VALUES (?, ?, ?)",
                           (repository, json.dumps(tags), time.time()))
        await self._run(put)

    # The catalog.
    async def add_repository(self, name: str) -> None:
        def add() -> None:
            with self._tx() as db:
                db.execute("INSERT OR IGNORE INTO catalog VALUES (?, ?)", (name, time.time()))
        await self._run(add)

    async def repository_names(self) -> list[str]:
        return await self._run(self._column, "SELECT name FROM catalog ORDER BY name")

    async def has_repository(self, name: str) -> bool:
        return await self._run(self._one, "SELECT 1 FROM catalog WHERE name = ?",
                               name) is not None

    # Hosted repositories.
    async def hosted_names(self) -> list[str]:
        return await self._run(self._column,
                               "SELECT name FROM hosted_repositories ORDER BY name")

    async def hosted(self, name: str) -> HostedRepository | None:
        def read() -> HostedRepository | None:
            if self._one("SELECT 1 FROM hosted_repositories WHERE name = ?", name) is None:
                return None
            db = self._db
            return HostedRepository(
                name,
                dict(db.execute("SELECT tag, digest FROM hosted_tags WHERE name = ?", (name,))),
                dict(db.execute("SELECT digest, media_type FROM hosted_manifests "
                                "WHERE name = ?", (name,))),
                dict(db.execute("SELECT digest, size FROM hosted_blobs WHERE name = ?",
                                (name,))))
        return await self._run(read)

    async def hosted_blob(self, name: str, digest: str) -> int | None:
        row = await self._run(self._one, "SELECT size FROM hosted_blobs WHERE name = ? AND "
                              "digest = ?", name, digest)
        return row[0] if row is not None else None

    async def hosted_manifest(self, name: str, reference: str) -> str | None:
        if ":" in reference:  # a digest: tags hold no colon
            sql, args = ("SELECT digest FROM hosted_manifests WHERE name = ? AND digest = ?",
                         (name, reference))
        else:
            sql, args = ("SELECT t.digest FROM hosted_tags t JOIN hosted_manifests m ON "
                         "m.name = t.name AND m.digest = t.digest WHERE t.name = ? AND "
                         "t.tag = ?", (name, reference))
        row = await self._run(self._one, sql, *args)
        return row[0] if row is not None else None

    def _create(self, db: sqlite3.Connection, name: str) -> None:
        db.execute("INSERT OR IGNORE INTO hosted_repositories VALUES (?, ?)", (name, time.time()))

    async def link_blob(self, name: str, digest: str,
                        exists: Callable[[str], int | None]) -> int | None:
        def link() -> int | None:
            with self._tx() as db:
                # Checked inside the transaction: eviction removes files on this thread,
                # so the blob cannot go between this check and the link that protects it.
                found = exists(digest)
                if found is None:
                    return None
                self._create(db, name)
                db.execute("INSERT OR REPLACE INTO hosted_blobs VALUES (?, ?, ?, ?)",
                           (name, digest, found, time.time()))
                return found
        return await self._run(link)

    async def push_manifest(self, push: ManifestPush,
                            exists: Callable[[str], int | None]) -> None:
        def store() -> None:
            with self._tx() as db:
                for digest in push.blobs:
                    if exists(digest) is None:
                        raise ManifestBlobUnknown(f"blob {digest} is not in {push.name}; "
                                                  "push it first")
                self._create(db, push.name)
                now = time.time()
                db.executemany("INSERT OR REPLACE INTO hosted_blobs VALUES (?, ?, ?, ?)",
                               [(push.name, d, s, now) for d, s in push.blobs.items()])
                db.execute("INSERT OR IGNORE INTO manifests (digest, media_type, body) "
                           "VALUES (?, ?, ?)", (push.digest, push.media_type, push.body))
                self._add_item(db, push.digest, "manifest", len(push.body), push.refs, None)
                db.execute("INSERT OR REPLACE INTO hosted_manifests VALUES (?, ?, ?)",
                           (push.name, push.digest, push.media_type))
                db.executemany("INSERT OR REPLACE INTO hosted_tags VALUES (?, ?, ?)",
                               [(push.name, tag, push.digest) for tag in push.tags])
                if push.subject is not None and push.descriptor is not None:
                    db.execute("INSERT OR REPLACE INTO referrers VALUES (?, ?, ?, ?)",
                               (push.name, push.subject, push.digest,
                                json.dumps(push.descriptor)))
        await self._run(store)

    async def delete_hosted_tag(self, name: str, tag: str) -> bool:
        def delete() -> bool:
            with self._tx() as db:
                return db.execute("DELETE FROM hosted_tags WHERE name = ? AND tag = ?",
                                  (name, tag)).rowcount > 0
        return await self._run(delete)

    async def delete_hosted_manifest(self, name: str, digest: str) -> bool:
        def delete() -> bool:
            with self._tx() as db:
                if db.execute("DELETE FROM hosted_manifests WHERE name = ? AND digest = ?",
                              (name, digest)).rowcount == 0:
                    return False
                db.execute("DELETE FROM hosted_tags WHERE name = ? AND digest = ?",
                           (name, digest))
                db.execute("DELETE FROM referrers WHERE name = ? AND digest = ?", (name, digest))
                # Nothing else wants it (another repository, a cached tag, an index): it
                # goes now, so what only it referred to becomes free to go.
                wanted = db.execute(
                    "SELECT 1 FROM hosted_manifests WHERE digest = ? UNION ALL "
                    "SELECT 1 FROM tags WHERE digest = ? UNION ALL "
                    "SELECT 1 FROM refs WHERE child = ? UNION ALL "
                    "SELECT 1 FROM items WHERE digest = ? AND pinned = 1 LIMIT 1",
                    (digest, digest, digest, digest)).fetchone()
                if wanted is None:
                    self._remove_item(db, digest)
                return True
        return await self._run(delete)

    async def delete_hosted_blob(self, name: str, digest: str) -> bool:
        def delete() -> bool:
            with self._tx() as db:
                return db.execute("DELETE FROM hosted_blobs WHERE name = ? AND digest = ?",
                                  (name, digest)).rowcount > 0
        return await self._run(delete)

    async def referrers(self, name: str, subject: str) -> list[dict]:
        rows = await self._run(self._column, "SELECT descriptor FROM referrers WHERE name = ? "
                               "AND subject = ? ORDER BY digest", name, subject)
        return [json.loads(row) for row in rows]

    async def held_by_hosted(self) -> set[str]:
        rows = await self._run(self._column, "SELECT digest FROM hosted_blobs UNION "
                               "SELECT digest FROM hosted_manifests")
        return set(rows)

    # Pages for the cache view: each query walks a primary key in order from `after` and
    # stops at `limit`, so the first and the last page of 50,000 names cost alike; a
    # `contains` filter reads every name of the range (instr, not LIKE: `_` is in names).
    async def catalog_page(self, after: str, limit: int, contains: str = "") -> list[str]:
        return await self._run(self._column, "SELECT name FROM catalog WHERE name > ? AND "
                               "instr(name, ?) > 0 ORDER BY name LIMIT ?", after, contains, limit)

    async def hosted_page(self, after: str, limit: int, contains: str = "") -> list[str]:
        return await self._run(self._column, "SELECT name FROM hosted_repositories WHERE "
                               "name > ? AND instr(name, ?) > 0 ORDER BY name LIMIT ?",
                               after, contains, limit)

    async def hosted_tags_page(self, name: str, after: str, limit: int) -> list[str]:
        return await self._run(self._column, "SELECT tag FROM hosted_tags WHERE name = ? AND "
                               "tag > ? ORDER BY tag LIMIT ?", name, after, limit)

    async def tagged_page(self, prefix: str, after: str, limit: int, contains: str = "",
                          exclude: str | None = None) -> list[str]:
        # Keys starting with p are those in [p, p with its last character raised); an
        # excluded prefix splits the range in two, each read in key order. A range is
        # (lowest key, whether that one is out, first key after the range).
        ranges = [(prefix + after, True, _above(prefix))]
        if exclude:
            low, _, high = ranges[0]
            above = _above(exclude) or ""
            ranges = [(low, True, exclude),
                      (low, True, high) if low >= above else (above, False, high)]

        def read() -> list[str]:
            found: list[str] = []
            for low, strict, high in ranges:
                if high is not None and low >= high:
                    continue
                found += self._column(
                    f"SELECT repository FROM tags WHERE repository {'>' if strict else '>='} ? "
                    + ("AND repository < ? " if high is not None else "")
                    + "AND instr(substr(repository, ?), ?) > 0 GROUP BY repository "
                    "ORDER BY repository LIMIT ?",
                    low, *([high] if high is not None else []), len(prefix) + 1, contains,
                    limit - len(found))
                if len(found) >= limit:
                    break
            return [key[len(prefix):] for key in found]
        return await self._run(read)

    async def repository_tags(self, repositories: Iterable[str]
                              ) -> dict[str, list[tuple[str, str, TagRecord]]]:
        keys = sorted(set(repositories))

        def read() -> dict[str, list[tuple[str, str, TagRecord]]]:
            found: dict[str, list[tuple[str, str, TagRecord]]] = {key: [] for key in keys}
            for row in self._db.execute(
                    "SELECT repository, tag, accept_class, digest, media_type, size, "
                    f"checked_at FROM tags WHERE repository IN ({', '.join('?' * len(keys))}) "
                    "ORDER BY repository, tag, accept_class", keys):
                found[row[0]].append((row[1], row[2], TagRecord(*row[3:])))
            return found
        return await self._run(read) if keys else {}

    async def ledger_entries(self, digests: Iterable[str]) -> dict[str, tuple[Item, list[str]]]:
        wanted = sorted(set(digests))

        def read() -> dict[str, tuple[Item, list[str]]]:
            found: dict[str, tuple[Item, list[str]]] = {}
            for part in _chunks(wanted):
                for row in self._db.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE digest "
                                            f"IN ({', '.join('?' * len(part))})", part):
                    found[row[0]] = (self._item(row), [])
            # Only a manifest refers to anything: a level of blobs costs one query, not two.
            manifests = sorted(d for d, (item, _) in found.items() if item.kind == "manifest")
            for part in _chunks(manifests):
                for parent, child in self._db.execute(
                        "SELECT parent, child FROM refs WHERE parent IN "
                        f"({', '.join('?' * len(part))})", part):
                    found[parent][1].append(child)
            return found
        return await self._run(read) if wanted else {}

    async def manifests_of(self, digests: Iterable[str]) -> dict[str, tuple[str, bytes]]:
        wanted = sorted(set(digests))

        def read() -> dict[str, tuple[str, bytes]]:
            found: dict[str, tuple[str, bytes]] = {}
            for part in _chunks(wanted):
                for digest, media_type, body in self._db.execute(
                        "SELECT digest, media_type, body FROM manifests WHERE digest IN "
                        f"({', '.join('?' * len(part))})", part):
                    found[digest] = (media_type, bytes(body))
            return found
        return await self._run(read) if wanted else {}


def _chunks(values: list[str], size: int = 500) -> list[list[str]]:
    """Parts of `values` small enough for one `IN (...)` each (SQLite bounds parameters)."""
    return [values[i:i + size] for i in range(0, len(values), size)]


def _above(prefix: str) -> str | None:
    """The least string after every string that starts with `prefix` (None: no bound)."""
    if not prefix:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
