"""Ledger: the usage ledger of the SQLite metadata store — sizes, clocks, pins, references,
and the per-item eviction decision.

    items(digest → kind, size, atime, pinned)   [index: atime]   what is stored
    refs(parent, child)                         [index: child]   what refers to what

A hit refreshes a clock in memory (`touch`); `flush` writes the clocks in one transaction,
so a busy mirror does not write to disk per request. The running total is kept in memory
and summed anew only when another process (an import) changed the database since.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Callable, Iterable

from .database import Database
from .metadata import Evicted, Item

ITEM_COLUMNS = "digest, kind, size, atime, pinned"


class Ledger(Database):
    def __init__(self, root: str | Path):
        self._clock: dict[str, float] = {}  # hits' clocks not written yet
        self._total = 0  # bytes the ledger holds
        self._version = 0  # the database's data_version when _total was summed
        super().__init__(root)

    def _open(self) -> None:
        super()._open()
        self._total, self._version = self._sum(), self._data_version()

    def _sum(self) -> int:
        return self._one("SELECT coalesce(sum(size), 0) FROM items")[0]

    def _data_version(self) -> int:
        return self._one("PRAGMA data_version")[0]

    def _add_item(self, db: sqlite3.Connection, digest: str, kind: str, size: int,
                  refs: Iterable[str], atime: float | None) -> None:
        now = time.time() if atime is None else atime
        added = db.execute("INSERT OR IGNORE INTO items (digest, kind, size, atime) "
                           "VALUES (?, ?, ?, ?)", (digest, kind, size, now)).rowcount
        if added:
            self._total += size
        else:
            db.execute("UPDATE items SET atime = max(atime, ?) WHERE digest = ?", (now, digest))
        db.executemany("INSERT OR IGNORE INTO refs (parent, child) VALUES (?, ?)",
                       [(digest, child) for child in refs])

    def _remove_item(self, db: sqlite3.Connection, digest: str) -> None:
        row = db.execute("DELETE FROM items WHERE digest = ? RETURNING size",
                         (digest,)).fetchone()
        if row is not None:
            self._total -= row[0]
        db.execute("DELETE FROM refs WHERE parent = ?", (digest,))
        db.execute("DELETE FROM tags WHERE digest = ?", (digest,))
        db.execute("DELETE FROM manifests WHERE digest = ?", (digest,))

    def record_blob(self, digest: str, size: int, atime: float | None = None) -> None:
        def add() -> None:
            with self._tx() as db:
                self._add_item(db, digest, "blob", size, (), atime)
        self._queue(add)

    def touch(self, digest: str) -> None:
        self._clock[digest] = time.time()

    async def flush(self) -> None:
        if self._clock:
            clock, self._clock = self._clock, {}
            await self._run(self._write_clock, clock)

    def _item(self, row: tuple | None) -> Item | None:
        if row is None:
            return None
        return Item(row[0], row[1], row[2], max(row[3], self._clock.get(row[0], 0.0)),
                    bool(row[4]))

    async def item(self, digest: str) -> Item | None:
        return self._item(await self._run(
            self._one, f"SELECT {ITEM_COLUMNS} FROM items WHERE digest = ?", digest))

    async def items(self) -> list[Item]:
        def read() -> list[Item]:
            return [self._item(r) for r in self._db.execute(f"SELECT {ITEM_COLUMNS} FROM items")]
        return await self._run(read)

    async def oldest(self, before: float, after: tuple[float, str] = (0.0, ""),
                     limit: int = 500) -> list[Item]:
        atime, digest = after

        def read() -> list[Item]:
            rows = self._db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items WHERE atime < ? "
                "AND (atime > ? OR (atime = ? AND digest > ?)) ORDER BY atime, digest LIMIT ?",
                (before, atime, atime, digest, limit)).fetchall()
            return [Item(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]
        return await self._run(read)

    async def parents(self, digest: str) -> list[str]:
        return await self._run(self._column, "SELECT parent FROM refs WHERE child = ?", digest)

    async def children(self, digest: str) -> list[str]:
        return await self._run(self._column, "SELECT child FROM refs WHERE parent = ?", digest)

    async def pin(self, digest: str, pinned: bool = True) -> bool:
        def pin() -> bool:
            with self._tx() as db:
                return db.execute("UPDATE items SET pinned = ? WHERE digest = ?",
                                  (int(pinned), digest)).rowcount == 1
        return await self._run(pin)

    async def pinned_closure(self) -> set[str]:
        def closure() -> set[str]:
            found = set(self._column("SELECT digest FROM items WHERE pinned = 1"))
            frontier = list(found)
            while frontier:
                for child in self._column("SELECT child FROM refs WHERE parent = ?",
                                          frontier.pop()):
                    if child not in found:
                        found.add(child)
                        frontier.append(child)
            return found
        return await self._run(closure)

    async def forget(self, digest: str) -> None:
        def forget() -> None:
            with self._tx() as db:
                self._remove_item(db, digest)
        await self._run(forget)
        self._clock.pop(digest, None)

    async def evict(self, digest: str, cutoff: float, in_use: Callable[[str], bool],
                    remove_file: Callable[[str], None],
                    linked_before: float = 0.0) -> Evicted | None:
        def evict() -> Evicted | None:
            with self._tx() as db:
                item = self._item(db.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE "
                                             "digest = ?", (digest,)).fetchone())
                if item is None or item.pinned or item.atime >= cutoff or in_use(digest):
                    return None
                held = db.execute(
                    "SELECT 1 FROM refs WHERE child = ? UNION ALL "
                    "SELECT 1 FROM hosted_blobs WHERE digest = ? AND linked_at >= ? UNION ALL "
                    "SELECT 1 FROM hosted_manifests WHERE digest = ? LIMIT 1",
                    (digest, digest, linked_before, digest)).fetchone()
                if held is not None:
                    return None
                children = [r[0] for r in db.execute("SELECT child FROM refs WHERE parent = ?",
                                                      (digest,))]
                tags = [tuple(r) for r in db.execute(
                    "SELECT repository, tag, accept_class FROM tags WHERE digest = ?", (digest,))]
                if item.kind == "blob":
                    # On this thread, inside the transaction: a mount or a manifest push
                    # that links this blob runs before (and keeps it) or after (and sees
                    # it gone), never in between.
                    remove_file(digest)
                    # Links older than the grace that nothing refers to go with it.
                    db.execute("DELETE FROM hosted_blobs WHERE digest = ?", (digest,))
                self._remove_item(db, digest)
                return Evicted(item, children, tags)
        evicted = await self._run(evict)
        if evicted is not None:
            self._clock.pop(digest, None)
        return evicted

    def _final(self) -> None:
        clock, self._clock = self._clock, {}
        if clock:
            self._write_clock(clock)
        super()._final()

    def _write_clock(self, clock: dict[str, float]) -> None:
        with self._tx() as db:
            db.executemany("UPDATE items SET atime = max(atime, ?) WHERE digest = ?",
                           [(t, d) for d, t in clock.items()])

    def total(self) -> int:
        return self._total

    async def refresh_total(self) -> int:
        def refresh() -> int:
            version = self._data_version()
            if version != self._version:  # another process (an import) wrote since
                self._total, self._version = self._sum(), version
            return self._total
        return await self._run(refresh)

