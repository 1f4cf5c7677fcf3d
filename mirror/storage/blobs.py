"""BlobStore: verified blobs as content-addressed files, committed by an atomic rename.

    <root>/
      blobs/sha256/ab/ab12...ef   a committed blob: its sha256 was checked before it got here
      tmp/fill-*                  spool files of fills in progress (emptied at every start)
      index/                      the metadata index (index.py)

A blob file appears under blobs/ only through `commit`, which fsyncs the spool and then
renames it into place, so a crash never leaves a truncated or unverified file where it
would be served. Spool files live outside blobs/ because aiohttp's FileResponse would serve
a `.gz` twin lying next to a blob.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from .usage import Usage

log = logging.getLogger("mirror")


class BlobStore:
    def __init__(self, root: str | Path, usage: Usage):
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
        fd, name = tempfile.mkstemp(prefix="fill-", dir=self.tmp)
        return fd, Path(name)

    def commit(self, spool: Path, digest: str) -> Path:
        """Move a spool file whose bytes were verified and fsynced into its place."""
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(spool, final)
        self.usage.add(digest, "blob", final.stat().st_size)
        return final

    def remove(self, digest: str) -> None:
        """Delete a blob's file and forget it in the ledger."""
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass
        self.usage.remove(digest)


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
