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

from . import config as cfg
from .blobs import BlobStore
from .hosted import Hosted
from .index import Index
from .media import references
from .memory import Memory
from .reference import Router
from .uploads import Uploads
from .usage import Usage

SPOOL_GRACE = 3600.0


@dataclass
class Report:
    checked: int = 0
    removed: int = 0
    removed_bytes: int = 0
    bad: list[str] = field(default_factory=list)


class Storage:
    """The stores of one storage root, opened for a command-line tool."""

    def __init__(self, config: cfg.Config):
        root = config.storage.root
        self.root = Path(root)
        self.usage = Usage(root)
        self.store = BlobStore(root, self.usage)
        self.memory = Memory()
        self.index = Index(root, self.memory, self.usage)
        self.hosted = Hosted(root, self.index, self.store, config.hosted,
                             Router(config.upstreams))
        self.uploads = Uploads(root, self.store, config.hosted.upload_ttl)

    def close(self) -> None:
        self.hosted.close()
        self.index.close()
        self.usage.close()


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


async def gc(storage: Storage, grace: float = 3600.0) -> Report:
    report = Report()
    storage.uploads.expire()
    now = time.time()
    for path in storage.store.tmp.iterdir():
        if now - path.stat().st_mtime > SPOOL_GRACE:
            report.removed += 1
            report.removed_bytes += path.stat().st_size
            path.unlink(missing_ok=True)
    kept = storage.hosted.held | storage.usage.pinned_closure()
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
    return report


async def verify(storage: Storage, progress=None) -> Report:
    report = Report()
    files = list(_blob_files(storage.store))
    quarantine = storage.root / "quarantine"
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
    return report


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
