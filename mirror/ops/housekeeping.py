"""`mirror gc` and `mirror verify`: storage housekeeping, safe while the server runs.

- adopt: a storage root from before the ledger existed gets its blobs and manifests
  entered into it once, at the server's start, so that budget and gc know them.
- gc: removes expired uploads, spool files no fill has touched for an hour, blob files the
  ledger does not know, and blobs nothing refers to (no cached or hosted manifest, not
  pinned) that were not used for `grace` seconds.
- verify: re-hashes every stored blob; one whose bytes do not match its name is moved to
  `<root>/quarantine/`, and every manifest that refers to it is forgotten with its tags,
  so the next pull fetches a good copy.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as cfg
from ..cache.hosted import Hosted
from ..media import references
from ..reference import Router
from ..storage.blobs import BlobStore
from ..storage.index import Index
from ..storage.uploads import Uploads
from ..storage.usage import Usage
from .local import Storage

SPOOL_GRACE = 3600.0


@dataclass
class Report:
    checked: int = 0
    removed: int = 0
    removed_bytes: int = 0
    bad: list[str] = field(default_factory=list)


def adopt(store: BlobStore, index: Index, usage: Usage) -> int:
    """Enter blob files and manifests that the ledger does not know; how many."""
    count = 0
    for key in index.db.iterkeys():
        if isinstance(key, str) and key.startswith("m:") and usage.item(key[2:]) is None:
            media_type, body = index.db.get(key)
            usage.add(key[2:], "manifest", len(body), references(body))
            count += 1
    for path, digest in _blob_files(store):
        if usage.item(digest) is None:
            stat = path.stat()
            usage.add(digest, "blob", stat.st_size, atime=stat.st_mtime)
            count += 1
    return count


async def gc(config: cfg.Config, grace: float = 3600.0) -> Report:
    report = Report()
    storage = Storage(config)
    hosted = _hosted(config, storage)
    try:
        Uploads(config.storage.root, storage.store, config.hosted.upload_ttl).expire()
        now = time.time()
        for path in storage.store.tmp.iterdir():
            if now - path.stat().st_mtime > SPOOL_GRACE:
                report.removed += 1
                report.removed_bytes += path.stat().st_size
                path.unlink(missing_ok=True)
        kept = hosted.held | storage.usage.pinned_closure()
        for path, digest in _blob_files(storage.store):
            report.checked += 1
            item = storage.usage.item(digest)
            unknown = item is None
            unreferenced = item is not None and item.atime < now - grace \
                and not storage.usage.parents(digest)
            if digest not in kept and (unknown or unreferenced):
                report.removed += 1
                report.removed_bytes += path.stat().st_size
                storage.store.remove(digest)
    finally:
        hosted.close()
        await storage.close()
    return report


async def verify(config: cfg.Config, progress=None) -> Report:
    report = Report()
    storage = Storage(config)
    try:
        files = list(_blob_files(storage.store))
        quarantine = Path(config.storage.root) / "quarantine"
        for number, (path, digest) in enumerate(files, 1):
            if progress:
                progress(number, len(files), digest)
            report.checked += 1
            algorithm, _, expected = digest.partition(":")
            hasher = hashlib.new(algorithm)
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
            if hasher.hexdigest() == expected:
                continue
            report.bad.append(digest)
            quarantine.mkdir(exist_ok=True)
            os.replace(path, quarantine / f"{algorithm}-{expected}")
            for parent in _ancestors(storage.usage, digest):
                await storage.index.drop_manifest(parent)
            storage.usage.remove(digest)
    finally:
        await storage.close()
    return report


def _hosted(config: cfg.Config, storage: Storage) -> Hosted:
    return Hosted(config.storage.root, storage.index, storage.store, config.hosted,
                  Router(config.upstreams))


def _ancestors(usage: Usage, digest: str) -> list[str]:
    """The manifests that refer to `digest`, and the indexes that refer to those."""
    found, frontier = [], [digest]
    while frontier:
        for parent in usage.parents(frontier.pop()):
            if parent not in found:
                found.append(parent)
                frontier.append(parent)
    return found


def _blob_files(store: BlobStore):
    for algorithm_dir in store.blobs.iterdir():
        for path in algorithm_dir.glob("*/*"):
            if path.is_file():
                yield path, f"{algorithm_dir.name}:{path.name}"


def terminal_progress(number: int, total: int, digest: str) -> None:
    """A one-line progress display on a terminal; nothing when output is redirected."""
    if sys.stderr.isatty():
        end = "\n" if number == total else ""
        sys.stderr.write(f"\rverifying {number}/{total} {digest[:19]}…{end}")
        sys.stderr.flush()
