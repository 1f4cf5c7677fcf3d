"""BlobStore: verified blobs as content-addressed files, committed by an atomic rename.

    <root>/
      blobs/sha256/ab/ab12...ef   a committed blob: its sha256 was checked before it got here
      tmp/fill-*                  spool files of fills in progress (emptied at every start)
      metadata.sqlite             the metadata store (sqlite.py)

A blob file appears under blobs/ only through `commit`, which fsyncs the spool, renames it
into place and then fsyncs the directory (and any directory it had to create), so a crash
never leaves a truncated or unverified file where it would be served, and a commit that
returned survives a crash. A full disk there is a `StorageFull` naming the disk. Spool
files live outside blobs/ because aiohttp's FileResponse would serve a `.gz` twin lying
next to a blob.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import storage_error
from .metadata import Metadata

log = logging.getLogger("mirror")


class BlobStore:
    def __init__(self, root: str | Path, usage: Metadata):
        self.root = Path(root)
        self.usage = usage
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def remove_spools(self) -> None:
        """At the server's start: whatever is in tmp/ is a fill a crash or stop interrupted.
        (Not for command-line tools: the server may be filling while they run.)"""
        leftovers = list(self.tmp.iterdir())
        if leftovers:
            log.info("removing %d unfinished spool file(s) from %s", len(leftovers), self.tmp)
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def path(self, digest: str) -> Path:
        """The file of a digest that reference.parse_digest has already validated."""
        algorithm, _, encoded = digest.partition(":")
        return self.blobs / algorithm / encoded[:2] / encoded

    def size(self, digest: str) -> int | None:
        """The size of a committed blob, or None when it is not in the store."""
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    def spool(self) -> tuple[int, Path]:
        """A new spool file in tmp/, opened for writing; its name is not a digest."""
        try:
            fd, name = tempfile.mkstemp(prefix="fill-", dir=self.tmp)
        except OSError as e:
            raise storage_error(e, self.root) from e
        return fd, Path(name)

    def commit(self, spool: Path, digest: str) -> Path:
        """Move a spool file whose bytes were verified and fsynced into its place."""
        final, size = self.place(spool, digest)
        self.usage.record_blob(digest, size)
        return final

    async def commit_async(self, spool: Path, digest: str) -> Path:
        """`commit`, with the renaming and fsyncing on a worker thread."""
        final, size = await asyncio.get_running_loop().run_in_executor(
            None, self.place, spool, digest)
        self.usage.record_blob(digest, size)
        return final

    def place(self, spool: Path, digest: str) -> tuple[Path, int]:
        """The filesystem half of a commit: rename, then make the rename durable; the
        blob's path and size. Thread-safe; StorageError (StorageFull) when it fails."""
        final = self.path(digest)
        try:
            created = [d for d in (final.parent.parent, final.parent) if not d.is_dir()]
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(spool, final)
            size = final.stat().st_size
        except OSError as e:
            raise storage_error(e, self.root) from e
        # The rename is an entry in the directory: without an fsync of it, a crash right
        # after the commit can lose the blob (and a new directory's own entry).
        for directory in {final.parent, *(d.parent for d in created)}:
            try:
                fsync_dir(directory)
            except OSError as e:  # the blob is in place; only its durability is in doubt
                log.error("cannot fsync %s after committing %s: %s", directory, digest,
                          e.strerror)
        return final, size

    def remove(self, digest: str) -> None:
        """Delete a blob's file (its ledger entry is the caller's: Metadata.evict/forget)."""
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass


def fsync_dir(directory: Path) -> None:
    """Make the entries of a directory (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a regular file may take fewer at once)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """os.pwrite until every byte is written at `offset`."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
