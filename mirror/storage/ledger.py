"""Ledger: the usage ledger of the SQLite metadata store — sizes, clocks, pins, references,
and the per-item eviction decision.

    items(digest → kind, size, atime, pinned)   [index: atime, digest]   what is stored
    refs(parent, child)                         [index: child]           what refers to what

A hit refreshes a clock in memory (`touch`); `flush` writes the clocks in one transaction,
so a busy mirror does not write to disk per request, and one item's clock at most once a
minute (a clock not written yet still counts, in memory). The running total is kept in memory
and in `meta['ledger_total']`, which every transaction that enters or removes an item
changes with it: opening a million-item ledger, or seeing another process's (an import's)
writes, reads one row instead of summing every size.

`meta['ledger_agrees_at']` is the time up to which every blob file committed or removed is
reflected in `items` (written by `flush` after files changed, and by the start-up
reconciliation, ops/housekeeping.py): a restart compares with the disk only the blob
directories changed since, not every file and row.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Callable, Iterable

from .database import Database
from .metadata import Evicted, Item

ITEM_COLUMNS = "digest, kind, size, atime, pinned"
AGREES_AT = "ledger_agrees_at"  # the meta key (see above); bench/synthetic.py writes it too
TOTAL = "ledger_total"  # the meta key of the running total (see above)
CLOCK_SECONDS = 60.0  # an item's clock is written at most this often (eviction order is LRU)


class Ledger(Database):
    def __init__(self, root: str | Path):
        self._clock: dict[str, float] = {}  # hits' clocks not written yet
        self._total = 0  # bytes the ledger holds
        self._version = 0  # the database's data_version when _total was summed
        self._files_changed = False  # a blob was entered or removed since the last flush
        self._written: dict[str, float] = {}  # when each recently written clock was written
        super().__init__(root)

    def _open(self) -> None:
        super()._open()
        self._total, self._version = self._stored_total(), self._data_version()

    def _stored_total(self) -> int:
        row = self._one("SELECT value FROM meta WHERE key = ?", TOTAL)
        if row is not None:
            return int(row[0])
        # A ledger from before the stored total (or a filled benchmark root): summed once.
        with self._tx() as db:
            total = db.execute("SELECT coalesce(sum(size), 0) FROM items").fetchone()[0]
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (TOTAL, total))
        return total

    def _count(self, db: sqlite3.Connection, size: int) -> None:
        """Change the running total by `size`, in the caller's transaction."""
        self._total += size
        db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (size, TOTAL))

    def _data_version(self) -> int:
        return self._one("PRAGMA data_version")[0]

    def _add_item(self, db: sqlite3.Connection, digest: str, kind: str, size: int,
                  refs: Iterable[str], atime: float | None) -> None:
        now = time.time() if atime is None else atime
        added = db.execute("INSERT OR IGNORE INTO items (digest, kind, size, atime) "
                           "VALUES (?, ?, ?, ?)", (digest, kind, size, now)).rowcount
        if added:
            self._count(db, size)
        else:
            db.execute("UPDATE items SET atime = max(atime, ?) WHERE digest = ?", (now, digest))
        db.executemany("INSERT OR IGNORE INTO refs (parent, child) VALUES (?, ?)",
                       [(digest, child) for child in refs])

    def _remove_item(self, db: sqlite3.Connection, digest: str) -> None:
        row = db.execute("DELETE FROM items WHERE digest = ? RETURNING size",
                         (digest,)).fetchone()
        if row is not None:
            self._count(db, -row[0])
        db.execute("DELETE FROM refs WHERE parent = ?", (digest,))
        db.execute("DELETE FROM tags WHERE digest = ?", (digest,))
        db.execute("DELETE FROM manifests WHERE digest = ?", (digest,))

    def record_blob(self, digest: str, size: int, atime: float | None = None) -> None:
        def add() -> None:
            with self._tx() as db:
                self._add_item(db, digest, "blob", size, (), atime)
        self._files_changed = True
        self._queue(add)

    def touch(self, digest: str) -> None:
        self._clock[digest] = time.time()

    async def flush(self) -> None:
        # Taken before the write is queued: every blob entered before now is queued ahead
        # of it, so once it is written the ledger reflects every commit up to `now`.
        now, changed = time.time(), self._files_changed
        # A clock written less than CLOCK_SECONDS ago is not written again yet: it stays in
        # memory (where `_item`, and so eviction's check, sees it) until it is due. At a
        # million items each update is a random page or two, and rewriting the same hot
        # items every 5 s held the metadata thread (and every read behind it) for 0.5 s.
        self._written = {d: t for d, t in self._written.items() if now - t < CLOCK_SECONDS}
        due = {d: t for d, t in self._clock.items() if d not in self._written}
        if not due and not changed:
            return
        for digest in due:
            del self._clock[digest]
            self._written[digest] = now
        self._files_changed = False
        await self._run(self._write_clock, due, now if changed else None)

    # The start-up reconciliation's reads and writes (ops/housekeeping.py).
    async def agrees_at(self) -> float | None:
        row = await self._run(self._one, "SELECT value FROM meta WHERE key = ?", AGREES_AT)
        return float(row[0]) if row is not None else None

    async def agree(self, when: float) -> None:
        def write() -> None:
            with self._tx() as db:
                self._write_agreed(db, when)
        await self._run(write)

    def _write_agreed(self, db: sqlite3.Connection, when: float) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                   (AGREES_AT, repr(when)))

    async def blobs_under(self, prefix: str) -> set[str]:
        """Digests of the blobs in the ledger that start with `prefix` (`sha256:ab`): one
        range of the primary key, the rows of one blob directory."""
        # Digests are lowercase hex after the prefix: all of them sort below prefix + DEL.
        return set(await self._run(
            self._column, "SELECT digest FROM items WHERE digest >= ? AND digest < ? "
            "AND kind = 'blob'", prefix, prefix + "\x7f"))

    async def known(self, digests: list[str]) -> set[str]:
        """Which of `digests` the ledger holds (at most a few hundred per call)."""
        if not digests:
            return set()
        marks = ",".join("?" * len(digests))
        return set(await self._run(self._column, "SELECT digest FROM items WHERE digest IN "
                                   f"({marks})", *digests))

    async def enter_blobs(self, blobs: list[tuple[str, int, float]]) -> None:
        """Enter blob files found on the disk, (digest, size, mtime) each, in one transaction."""
        def enter() -> None:
            with self._tx() as db:
                for digest, size, atime in blobs:
                    self._add_item(db, digest, "blob", size, (), atime)
        await self._run(enter)

    async def forget_blobs(self, digests: list[str]) -> None:
        """Forget blobs whose files are gone, in one transaction."""
        def forget() -> None:
            with self._tx() as db:
                for digest in digests:
                    self._remove_item(db, digest)
        await self._run(forget)
        for digest in digests:
            self._clock.pop(digest, None)

    async def unrecorded_manifests(self) -> list[str]:
        """Manifests stored without a ledger row (a root from before the ledger)."""
        return await self._run(self._column, "SELECT digest FROM manifests WHERE digest NOT IN "
                               "(SELECT digest FROM items)")

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
            # A row value against the (atime, digest) index: read in order, never sorted.
            rows = self._db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items WHERE atime < ? AND (atime, digest) > (?, ?) "
                "ORDER BY atime, digest LIMIT ?", (before, atime, digest, limit)).fetchall()
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
            self._files_changed = True
        return evicted

    def _final(self) -> None:
        clock, self._clock = self._clock, {}
        if clock:
            self._write_clock(clock)
        super()._final()

    def _write_clock(self, clock: dict[str, float], agrees_at: float | None = None) -> None:
        with self._tx() as db:
            db.executemany("UPDATE items SET atime = max(atime, ?) WHERE digest = ?",
                           [(t, d) for d, t in clock.items()])
            if agrees_at is not None:
                self._write_agreed(db, agrees_at)

    def total(self) -> int:
        return self._total

    async def refresh_total(self) -> int:
        def refresh() -> int:
            version = self._data_version()
            if version != self._version:  # another process (an import) wrote since
                self._total, self._version = self._stored_total(), version
            return self._total
        return await self._run(refresh)

