"""Migration: a storage root of the layout before metadata.sqlite, copied in once.

    <root>/index/            diskcache: m:<digest>, t:<repo>:<tag>:<class>, l:<repo>
    <root>/index/catalog/    diskcache: one key per cached repository
    <root>/index/usage.sqlite   the ledger (items, refs)
    <root>/hosted/           diskcache: repo:<name>, referrers:<name>:<subject>

Everything is copied in one transaction, so a failed copy leaves nothing half-done and is
tried again at the next start; then the old folders are moved under <root>/migrated/.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import sys
import time
import types
from pathlib import Path

from .metadata import TagRecord

log = logging.getLogger("mirror")



def migrate(db: sqlite3.Connection, root: Path) -> None:
    index, hosted, usage = root / "index", root / "hosted", root / "index" / "usage.sqlite"
    if not any(p.exists() for p in (index / "cache.db", hosted / "cache.db", usage)):
        return
    log.info("copying the metadata of %s from its old layout into %s", root,
             root / "metadata.sqlite")
    if usage.exists():  # ATTACH is refused inside a transaction
        db.execute("ATTACH DATABASE ? AS old", (str(usage),))
    db.execute("BEGIN IMMEDIATE")
    try:
        counts = _copy_old(db, index, hosted, usage)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    finally:
        if usage.exists():
            db.execute("DETACH DATABASE old")
    moved = root / "migrated"
    moved.mkdir(exist_ok=True)
    for path in (index, hosted):
        if path.exists():
            shutil.move(str(path), str(moved / f"{path.name}-{int(time.time())}"))
    log.info("copied %s; the old files are in %s and may be removed", ", ".join(
        f"{n} {what}" for what, n in counts.items()), moved)


def _copy_old(db: sqlite3.Connection, index: Path, hosted: Path,
              usage: Path) -> dict[str, int]:
    import diskcache  # only for reading the old layout

    counts = {"manifests": 0, "tag records": 0, "hosted repositories": 0, "ledger rows": 0}
    # The old tag records were pickled as mirror.index.TagRecord (same fields as ours).
    shim = types.ModuleType("mirror.index")
    shim.TagRecord = TagRecord  # type: ignore[attr-defined]
    sys.modules.setdefault("mirror.index", shim)
    if usage.exists():
        db.execute("INSERT OR IGNORE INTO items SELECT digest, kind, size, atime, pinned "
                   "FROM old.items")
        db.execute("INSERT OR IGNORE INTO refs SELECT parent, child FROM old.refs")
        counts["ledger rows"] = db.execute("SELECT count(*) FROM old.items").fetchone()[0]
    if (index / "cache.db").exists():
        with diskcache.Cache(str(index)) as old:
            for key in old.iterkeys():
                value = old.get(key)
                if not isinstance(key, str) or value is None:
                    continue
                kind, _, rest = key.partition(":")
                if kind == "m":
                    db.execute("INSERT OR IGNORE INTO manifests VALUES (?, ?, ?)",
                               (rest, value[0], value[1]))
                    counts["manifests"] += 1
                elif kind == "t":
                    repository, tag, accept_class = rest.rsplit(":", 2)
                    db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (repository, tag, accept_class, value.digest, value.media_type,
                                value.size, value.checked_at))
                    counts["tag records"] += 1
                elif kind == "l":
                    db.execute("INSERT OR REPLACE INTO tag_lists VALUES (?, ?, ?)",
                               (rest, json.dumps(value[0]), value[1]))
        if (index / "catalog" / "cache.db").exists():
            with diskcache.Cache(str(index / "catalog")) as old:
                db.executemany("INSERT OR IGNORE INTO catalog VALUES (?, ?)",
                               [(k, old.get(k) or time.time()) for k in old.iterkeys()])
    if (hosted / "cache.db").exists():
        with diskcache.Cache(str(hosted)) as old:
            for key in old.iterkeys():
                value = old.get(key)
                if not isinstance(key, str) or value is None:
                    continue
                if key.startswith("repo:"):
                    name = key[5:]
                    db.execute("INSERT OR IGNORE INTO hosted_repositories VALUES (?, ?)",
                               (name, time.time()))
                    db.executemany("INSERT OR REPLACE INTO hosted_tags VALUES (?, ?, ?)",
                                   [(name, t, d) for t, d in value["tags"].items()])
                    db.executemany("INSERT OR REPLACE INTO hosted_manifests VALUES (?, ?, ?)",
                                   [(name, d, m) for d, m in value["manifests"].items()])
                    db.executemany("INSERT OR REPLACE INTO hosted_blobs VALUES (?, ?, ?, ?)",
                                   [(name, d, s, time.time())
                                    for d, s in value["blobs"].items()])
                    counts["hosted repositories"] += 1
                elif key.startswith("referrers:"):
                    name, _, subject = key[10:].partition(":")  # names hold no colon
                    db.executemany("INSERT OR REPLACE INTO referrers VALUES (?, ?, ?, ?)",
                                   [(name, subject, d, json.dumps(desc))
                                    for d, desc in value.items()])
    return counts
