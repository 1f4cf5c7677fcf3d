"""`mirror gc` and `mirror verify`, and the reconciliation the server does at every start.

- reconcile (at each server start): blob files the ledger does not know are entered into
  it (a crash between a commit and its ledger write), and ledger rows of blobs whose file
  is gone are forgotten, so the budget and gc count what is really on the disk. Only the
  blob directories (`blobs/<algorithm>/<ab>/`) changed since the ledger last agreed with
  the disk (ledger.py's `agrees_at`, less `AGREEMENT_SLACK`) are listed and compared: a
  directory's mtime moves with every file added to it or removed from it, so the start of
  a million-item cache costs 256 stats, not a million. A root with no such time (from an
  older version) is compared whole once, manifests without ledger rows included. A ledger
  row whose file is missing from a directory nobody changed since (removed behind the
  server's back in a way that kept the directory's mtime, or a filled benchmark root) is
  left alone: it counts towards the budget until eviction takes it (no file to remove),
  and a GET of it is a miss that fetches the blob again.
- gc: removes expired uploads; spool files in tmp/ only when no server holds the storage
  root (a live server's spools are fills in progress or downloads kept for resuming, and
  the server empties tmp/ at its next start); blob files the ledger does not know that are
  older than `grace`; and blobs nothing refers to (no cached or hosted manifest, not
  pinned, not pushed within `hosted.upload_ttl`) that were not used for `grace` seconds —
  each one through the same per-item eviction check the server's budget uses, so a blob a
  push just uploaded or mounted is never taken. A file evicted by the live server while
  gc or verify walks the store is skipped.
- verify: re-hashes every stored blob; one whose bytes do not match its name is moved to
  `<root>/quarantine/`, and every cached manifest that refers to it is forgotten with its
  tags, so the next pull fetches a good copy. A pushed blob has no upstream to fetch it
  from: the report names the hosted images that refer to it (they cannot be pulled until
  it is pushed again), and their manifests are kept, whose bytes are sound, so that pushing
  the image again uploads only what is missing. A blob both cached and pushed (one file)
  comes back with the next pull of the cached image, for both.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import config as cfg
from ..media import references
from ..storage import lock
from ..storage.blobs import BlobStore
from ..storage.ledger import Ledger
from ..storage.metadata import Metadata
from ..storage.uploads import Uploads
from .local import Storage

SPOOL_GRACE = 3600.0
GC_BATCH = 500  # blob files looked up in the ledger per query


@dataclass
class Report:
    checked: int = 0
    removed: int = 0
    removed_bytes: int = 0
    bad: list[str] = field(default_factory=list)
    # Of the bad blobs, the pushed ones: the hosted images (name:tag, name@digest) that
    # refer to each, and whether a cached image has it too (its next pull mends both).
    pushed: dict[str, list[str]] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)
    skipped_spools: bool = False  # a server holds the root: tmp/ is its business


@dataclass
class Reconciled:
    entered: int = 0
    forgotten: int = 0
    dirs: int = 0  # blob directories listed and compared with the ledger


# A blob committed this long before the ledger's agreement time may still have had its
# ledger write queued (the write follows the commit; another process's import commits too).
AGREEMENT_SLACK = 10.0


async def reconcile(store: BlobStore, metadata: Ledger) -> Reconciled:
    """Make the ledger agree with the disk; see the module docstring."""
    result = Reconciled()
    started = time.time()
    agreed = await metadata.agrees_at()
    since = None if agreed is None else agreed - AGREEMENT_SLACK
    loop = asyncio.get_running_loop()
    for prefix, directory in await loop.run_in_executor(None, _changed_dirs, store, since):
        files = await loop.run_in_executor(None, _files_in, directory)
        known = await metadata.blobs_under(prefix)
        new = [(d, size, mtime) for d, (size, mtime) in files.items() if d not in known]
        gone = sorted(known - files.keys())
        if new:
            await metadata.enter_blobs(new)
        if gone:
            await metadata.forget_blobs(gone)
        result.dirs += 1
        result.entered, result.forgotten = result.entered + len(new), result.forgotten + len(gone)
    if agreed is None:  # a root from before the ledger: its manifests too, once
        for digest in await metadata.unrecorded_manifests():
            found = await metadata.manifest(digest)
            if found is not None:
                await metadata.put_manifest(digest, found[0], found[1], references(found[1]))
                result.entered += 1
    await metadata.agree(started)
    return result


def _changed_dirs(store: BlobStore, since: float | None) -> list[tuple[str, Path]]:
    """(`sha256:ab`, its directory) for every blob directory changed at or after `since`
    (all of them when None)."""
    found = []
    for algorithm in os.scandir(store.blobs):
        if not algorithm.is_dir():
            continue
        for entry in os.scandir(algorithm.path):
            if entry.is_dir() and (since is None or entry.stat().st_mtime >= since):
                found.append((f"{algorithm.name}:{entry.name}", Path(entry.path)))
    return found


def _files_in(directory: Path) -> dict[str, tuple[int, float]]:
    """digest -> (size, mtime) of the blob files in one `blobs/<algorithm>/<ab>/`."""
    algorithm = directory.parent.name
    files = {}
    for entry in os.scandir(directory):
        try:
            if entry.is_file():
                stat = entry.stat()
                files[f"{algorithm}:{entry.name}"] = (stat.st_size, stat.st_mtime)
        except FileNotFoundError:  # removed since the listing
            continue
    return files


async def gc(config: cfg.Config, grace: float = 3600.0) -> Report:
    report = Report()
    storage = Storage(config)
    try:
        Uploads(config.storage.root, storage.store, config.hosted.upload_ttl)  # expires them
        now = time.time()
        if lock.held(config.storage.root):
            report.skipped_spools = True
        else:
            for path in storage.store.tmp.iterdir():
                if now - path.stat().st_mtime > SPOOL_GRACE:
                    report.removed += 1
                    report.removed_bytes += path.stat().st_size
                    path.unlink(missing_ok=True)
        metadata = storage.metadata
        held = await metadata.held_by_hosted()
        linked_before = now - config.hosted.upload_ttl
        files = list(_blob_files(storage.store))
        for start in range(0, len(files), GC_BATCH):
            batch = files[start:start + GC_BATCH]
            # The ledger is asked about the files found, a batch at a time: the work
            # follows what is on the disk, not the size of the ledger.
            known = await metadata.known([digest for _, digest in batch])
            for path, digest in batch:
                await _collect(storage, report, path, digest, digest in known, held,
                               now - grace, linked_before)
    finally:
        await storage.close()
    return report


async def _collect(storage: Storage, report: Report, path: Path, digest: str, known: bool,
                   held: set[str], cutoff: float, linked_before: float) -> None:
    """gc of one blob file: unknown and old, or known and free to go (evict's check)."""
    report.checked += 1
    try:
        stat = path.stat()
    except FileNotFoundError:  # evicted by the running server since the listing
        return
    if not known:
        # A file the ledger does not know: a commit whose ledger write is still queued
        # looks the same for a moment, hence the grace on its age too.
        if stat.st_mtime < cutoff and digest not in held:
            storage.store.remove(digest)
            report.removed += 1
            report.removed_bytes += stat.st_size
        return
    evicted = await storage.metadata.evict(digest, cutoff, lambda d: False,
                                           storage.store.remove, linked_before)
    if evicted is not None:
        report.removed += 1
        report.removed_bytes += evicted.item.size


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
            actual = await asyncio.get_running_loop().run_in_executor(
                None, _hash_file, path, algorithm)
            if actual is None or actual == expected:  # None: evicted since the listing
                continue
            report.bad.append(digest)
            quarantine.mkdir(exist_ok=True)
            os.replace(path, quarantine / f"{algorithm}-{expected}")
            parents = await _ancestors(storage.metadata, digest)
            hosted = await _hosted_references(storage.metadata, digest, parents)
            if hosted.images:
                report.pushed[digest] = hosted.images
            for parent in parents:
                if parent not in hosted.manifests:  # a pushed manifest is kept (see above)
                    await storage.index.drop_manifest(parent)
                    report.cached.add(digest)
            if not hosted.images:
                report.cached.add(digest)
            await storage.metadata.forget(digest)
    finally:
        await storage.close()
    return report


@dataclass
class HostedReferences:
    images: list[str] = field(default_factory=list)  # team/app:1.0, team/app@sha256:...
    manifests: set[str] = field(default_factory=set)  # every manifest any repository holds


async def _hosted_references(metadata: Metadata, digest: str,
                             parents: list[str]) -> HostedReferences:
    """The hosted images that have `digest` (linked, or by one of its `parents`)."""
    found = HostedReferences()
    for name in await metadata.hosted_names():
        repository = await metadata.hosted(name)
        if repository is None:
            continue
        found.manifests.update(repository.manifests)
        having = {p for p in parents if p in repository.manifests}
        if not having and digest not in repository.blobs:
            continue
        tagged = sorted(tag for tag, target in repository.tags.items() if target in having)
        found.images += [f"{name}:{tag}" for tag in tagged]
        untagged = having - {repository.tags[tag] for tag in tagged}
        found.images += [f"{name}@{d}" for d in sorted(untagged)]
        if not having:
            found.images.append(f"{name} (a pushed blob no manifest refers to yet)")
    return found


def _hash_file(path: Path, algorithm: str) -> str | None:
    """The file's digest, or None when it is gone (a live server evicted it meanwhile)."""
    hasher = hashlib.new(algorithm)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
    except FileNotFoundError:
        return None
    return hasher.hexdigest()


async def _ancestors(metadata: Metadata, digest: str) -> list[str]:
    """The manifests that refer to `digest`, and the indexes that refer to those."""
    found, frontier = [], [digest]
    while frontier:
        for parent in await metadata.parents(frontier.pop()):
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
