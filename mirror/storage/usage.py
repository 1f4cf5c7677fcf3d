"""Usage: the ledger of cached content — sizes, last use, pins, and what refers to what.

    <root>/index/usage.sqlite
      items(digest PRIMARY KEY, kind 'blob'|'manifest', size, atime, pinned)  index on atime
      refs(parent, child)   a manifest's blobs, an index's manifests        index on child
      tags(key PRIMARY KEY, digest)   which tag record points where         index on digest

SQLite with indexes rather than diskcache, because eviction must read the oldest items
first and find what refers to a blob without walking the whole cache: a million blobs cost
an eviction pass only the rows it removes. A hit updates an in-memory clock; `flush`
writes the clocks in one transaction, so a busy mirror does not write to disk per request.
The ledger is safe to read and write from another process (`mirror prefetch --pin`,
`mirror import`) while the server runs.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    digest TEXT PRIMARY KEY, kind TEXT NOT NULL, size INTEGER NOT NULL,
    atime REAL NOT NULL, pinned INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS items_by_atime ON items (atime);
CREATE TABLE IF NOT EXISTS refs (parent TEXT NOT NULL, child TEXT NOT NULL,
    PRIMARY KEY (parent, child));
CREATE INDEX IF NOT EXISTS refs_by_child ON refs (child);
CREATE TABLE IF NOT EXISTS tags (key TEXT PRIMARY KEY, digest TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tags_by_digest ON tags (digest);
"""


@dataclass(frozen=True)
class Item:
    digest: str
    kind: str
    size: int
    atime: float
    pinned: bool


class Usage:
    def __init__(self, root: str | Path):
        path = Path(root) / "index" / "usage.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.new = not path.exists()
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._clock: dict[str, float] = {}
        self._total = self._sum()
        self._version = self._data_version()

    def close(self) -> None:
        self.flush()
        self.db.close()

    # Recording what is stored.
    def add(self, digest: str, kind: str, size: int, refs: Iterable[str] = (),
            atime: float | None = None) -> None:
        now = time.time() if atime is None else atime
        with self.db:
            added = self.db.execute(
                "INSERT OR IGNORE INTO items (digest, kind, size, atime) VALUES (?, ?, ?, ?)",
                (digest, kind, size, now)).rowcount
            if added:
                self._total += size
            else:
                self.db.execute("UPDATE items SET atime = max(atime, ?) WHERE digest = ?",
                                (now, digest))
            self.db.executemany("INSERT OR IGNORE INTO refs (parent, child) VALUES (?, ?)",
                                [(digest, child) for child in refs])

    def tag(self, key: str, digest: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO tags (key, digest) VALUES (?, ?)", (key, digest))

    def untag(self, key: str) -> None:
        self.db.execute("DELETE FROM tags WHERE key = ?", (key,))

    def remove(self, digest: str) -> None:
        """Forget an item, its references to others, and the tags that pointed to it."""
        with self.db:
            row = self.db.execute("DELETE FROM items WHERE digest = ? RETURNING size",
                                  (digest,)).fetchone()
            if row is not None:
                self._total -= row[0]
            self.db.execute("DELETE FROM refs WHERE parent = ?", (digest,))
            self.db.execute("DELETE FROM tags WHERE digest = ?", (digest,))
        self._clock.pop(digest, None)

    # The clock.
    def touch(self, digest: str) -> None:
        self._clock[digest] = time.time()

    def flush(self) -> None:
        if self._clock:
            clock, self._clock = self._clock, {}
            with self.db:
                self.db.executemany("UPDATE items SET atime = max(atime, ?) WHERE digest = ?",
                                    [(t, d) for d, t in clock.items()])

    # Pins: a pinned manifest, and everything it refers to, is never evicted.
    def pin(self, digest: str, pinned: bool = True) -> bool:
        """Pin (or unpin) an item; False when the ledger does not hold it."""
        cursor = self.db.execute("UPDATE items SET pinned = ? WHERE digest = ?",
                                 (int(pinned), digest))
        return cursor.rowcount == 1

    def pinned_closure(self) -> set[str]:
        """Every pinned item and all it refers to, transitively."""
        found = {row[0] for row in self.db.execute("SELECT digest FROM items WHERE pinned = 1")}
        frontier = list(found)
        while frontier:
            parent = frontier.pop()
            for (child,) in self.db.execute("SELECT child FROM refs WHERE parent = ?", (parent,)):
                if child not in found:
                    found.add(child)
                    frontier.append(child)
        return found

    # Reading.
    def item(self, digest: str) -> Item | None:
        row = self.db.execute("SELECT digest, kind, size, atime, pinned FROM items "
                              "WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            return None
        atime = max(row[3], self._clock.get(digest, 0.0))
        return Item(row[0], row[1], row[2], atime, bool(row[4]))

    def oldest(self, before: float) -> Iterator[Item]:
        """Items last used before `before`, oldest first, read a page at a time."""
        atime, digest = 0.0, ""
        while True:
            rows = self.db.execute(
                "SELECT digest, kind, size, atime, pinned FROM items "
                "WHERE atime < ? AND (atime > ? OR (atime = ? AND digest > ?)) "
                "ORDER BY atime, digest LIMIT 500", (before, atime, atime, digest)).fetchall()
            if not rows:
                return
            for row in rows:
                yield Item(row[0], row[1], row[2], row[3], bool(row[4]))
            digest, atime = rows[-1][0], rows[-1][3]

    def parents(self, child: str) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT parent FROM refs WHERE child = ?",
                                                  (child,))]

    def children(self, parent: str) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT child FROM refs WHERE parent = ?",
                                                  (parent,))]

    def tags_of(self, digest: str) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT key FROM tags WHERE digest = ?",
                                                  (digest,))]

    def total(self) -> int:
        """Bytes held, kept as a running sum; summed anew only when another process (an
        import, a prefetch) changed the ledger since."""
        version = self._data_version()
        if version != self._version:
            self._total, self._version = self._sum(), version
        return self._total

    def _sum(self) -> int:
        return self.db.execute("SELECT coalesce(sum(size), 0) FROM items").fetchone()[0]

    def _data_version(self) -> int:
        return self.db.execute("PRAGMA data_version").fetchone()[0]
