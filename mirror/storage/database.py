"""Database: one SQLite file on a thread of its own, with explicit transactions.

All SQLite work for one storage root runs on a single thread, in call order: the event loop
never waits on a lock another process holds (a `mirror import` writing beside the server),
and a write queued without waiting (`_queue`) is seen by every call made after it. Every
write is one `BEGIN IMMEDIATE ... COMMIT` (`_tx`), fsynced at commit (`synchronous=FULL`).
A full disk is errors.StorageFull (507), any other database failure MetadataBroken (500).
`SqliteMetadata` (sqlite.py) builds the metadata interface on it; the schema is here.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import StorageFull
from .metadata import MetadataBroken
from .migration import migrate

log = logging.getLogger("mirror")

# items_by_use is in the eviction order (atime, digest): a page of the oldest is read from it
# in order. Its predecessor, items_by_atime (atime alone), made SQLite sort every row older
# than the cut-off for each page (2.9 s a page at a million items); a root that has it gets
# the new index at its first open (about 3 s at a million items, once).
SCHEMA = """
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY, media_type TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tags (
    repository TEXT NOT NULL, tag TEXT NOT NULL, accept_class TEXT NOT NULL,
    digest TEXT NOT NULL, media_type TEXT NOT NULL, size INTEGER NOT NULL,
    checked_at REAL NOT NULL, PRIMARY KEY (repository, tag, accept_class));
CREATE INDEX IF NOT EXISTS tags_by_digest ON tags (digest);
CREATE TABLE IF NOT EXISTS tag_lists (
    repository TEXT PRIMARY KEY, tags TEXT NOT NULL, fetched_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS catalog (name TEXT PRIMARY KEY, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    digest TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL,
    atime REAL NOT NULL, pinned INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS items_by_use ON items (atime, digest);
DROP INDEX IF EXISTS items_by_atime;
CREATE TABLE IF NOT EXISTS refs (parent TEXT NOT NULL, child TEXT NOT NULL,
    PRIMARY KEY (parent, child));
CREATE INDEX IF NOT EXISTS refs_by_child ON refs (child);
CREATE TABLE IF NOT EXISTS hosted_repositories (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS hosted_tags (name TEXT NOT NULL, tag TEXT NOT NULL,
    digest TEXT NOT NULL, PRIMARY KEY (name, tag));
CREATE TABLE IF NOT EXISTS hosted_manifests (name TEXT NOT NULL, digest TEXT NOT NULL,
    media_type TEXT NOT NULL, PRIMARY KEY (name, digest));
CREATE INDEX IF NOT EXISTS hosted_manifests_by_digest ON hosted_manifests (digest);
CREATE TABLE IF NOT EXISTS hosted_blobs (name TEXT NOT NULL, digest TEXT NOT NULL,
    size INTEGER NOT NULL, linked_at REAL NOT NULL, PRIMARY KEY (name, digest));
CREATE INDEX IF NOT EXISTS hosted_blobs_by_digest ON hosted_blobs (digest);
CREATE TABLE IF NOT EXISTS referrers (name TEXT NOT NULL, subject TEXT NOT NULL,
    digest TEXT NOT NULL, descriptor TEXT NOT NULL, PRIMARY KEY (name, subject, digest));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# How long a write waits for another process's transaction (an import) before failing.
BUSY_TIMEOUT_MS = 15_000


class Database:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / "metadata.sqlite"
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="metadata")
        self._db: sqlite3.Connection
        self._closed = False
        # Opening happens at start-up, before anything is served: waiting for it is fine.
        self._thread.submit(self._guarded, self._open).result()

    # Running on the metadata thread.
    def _open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a transaction that returned is on the disk, also across a power cut.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        migrate(self._db, self.root)

    def _guarded(self, call: Callable, *args: Any) -> Any:
        """Run `call` on the metadata thread; map SQLite's failures to typed errors."""
        try:
            return call(*args)
        except sqlite3.OperationalError as e:
            text = str(e)
            if "full" in text or "quota" in text:
                raise StorageFull(f"the disk holding {self.path} is full: {text}; free space "
                                  "or raise storage.max_size headroom") from e
            raise MetadataBroken(f"the metadata database {self.path} failed: {text}") from e
        except sqlite3.Error as e:
            raise MetadataBroken(f"the metadata database {self.path} failed: {e}") from e

    async def _run(self, call: Callable, *args: Any) -> Any:
        if self._closed:
            raise MetadataBroken("the metadata database is closed")
        return await asyncio.wrap_future(self._thread.submit(self._guarded, call, *args))

    def _queue(self, call: Callable, *args: Any) -> None:
        """Run without waiting; a failure is logged (the queue keeps its order)."""
        future = self._thread.submit(self._guarded, call, *args)
        future.add_done_callback(_log_failure)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _one(self, sql: str, *args: Any) -> Any:
        return self._db.execute(sql, args).fetchone()

    def _column(self, sql: str, *args: Any) -> list:
        return [row[0] for row in self._db.execute(sql, args)]

    async def check(self) -> None:
        await self._run(self._one, "SELECT 1 FROM meta LIMIT 1")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.wrap_future(self._thread.submit(self._guarded, self._final))
        self._thread.shutdown(wait=True)

    def close_now(self) -> None:
        """Close from synchronous code (a command's end); queued writes finish first."""
        if self._closed:
            return
        self._closed = True
        self._thread.submit(self._guarded, self._final).result()
        self._thread.shutdown(wait=True)

    def _final(self) -> None:
        """On the thread, after every queued call: write what is held in memory, close."""
        self._db.close()


def _log_failure(future: Future) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        log.error("a queued metadata write failed: %s", error)

