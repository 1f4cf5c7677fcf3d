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

With `storage.backend = "s3"` (`remote` set) the object store holds the durable copy of
every blob, as `<prefix>blobs/<algorithm>/<hex>` (s3.py): a commit uploads the verified
spool there first, and only then is the blob entered in the shared ledger (awaited, so a
replica that answers 201 has made the blob visible to every other). The files under blobs/
are then the replica's local hot tier (tier.py), bounded by `storage.local_cache_size`;
without one, the spool is removed after its upload and every read goes to the object store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable

from ..errors import storage_error
from .metadata import Metadata
from .tier import LocalTier

if TYPE_CHECKING:
    from .s3 import ObjectStore

log = logging.getLogger("mirror")


# Digests known to be in the object store, remembered to spare a HEAD per request.
REMOTE_SIZES = 65536


class BlobStore:
    def __init__(self, root: str | Path, usage: Metadata, remote: ObjectStore | None = None,
                 local_size: int | None = None):
        self.root = Path(root)
        self.usage = usage
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.remote = remote
        # With an object store: the local copies, if any are kept at all.
        self.tier = LocalTier(self.blobs, local_size) if remote is not None and local_size \
            else None
        self._remote_sizes: dict[str, int] = {}

    @property
    def keeps_local(self) -> bool:
        """Whether committed blobs stay on this disk (always, but for S3 without a tier)."""
        return self.remote is None or self.tier is not None

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

    @staticmethod
    def object_name(digest: str) -> str:
        algorithm, _, encoded = digest.partition(":")
        return f"blobs/{algorithm}/{encoded}"

    async def stat(self, digest: str) -> int | None:
        """The size of a stored blob: its local file, else (with S3) its object; or None."""
        size = self.size(digest)
        if size is not None or self.remote is None:
            if size is not None and self.tier is not None:
                self.tier.used(digest)
            return size
        size = self._remote_sizes.get(digest)
        if size is None:
            size = await self.remote.size(self.object_name(digest))
            if size is not None:
                self._know_remote(digest, size)
        return size

    def _know_remote(self, digest: str, size: int) -> None:
        if len(self._remote_sizes) >= REMOTE_SIZES:
            self._remote_sizes.pop(next(iter(self._remote_sizes)))
        self._remote_sizes[digest] = size

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

    async def commit_async(self, spool: Path, digest: str, upload: bool = True) -> Path:
        """`commit`, with the renaming and fsyncing on a worker thread; with S3, the upload
        first (the durable copy), then the local copy if the tier keeps one. `upload=False`
        (a cluster follower, whose holder uploads and enters the blob): the local copy only."""
        loop = asyncio.get_running_loop()
        if self.remote is not None and not upload:
            if self.tier is None:
                spool.unlink(missing_ok=True)
                return self.path(digest)
            final, size = await loop.run_in_executor(None, self.place, spool, digest)
            self.tier.admit(digest, size)
            return final
        if self.remote is not None:
            size = await loop.run_in_executor(None, _size_of, spool)
            name = self.object_name(digest)
            # A blob read from the object store into the tier is there already.
            if self._remote_sizes.get(digest) != size and await self.remote.size(name) != size:
                await self.remote.upload_file(name, spool, size)
                log.info("uploaded %s to the object store (%d bytes)", digest, size)
            self._know_remote(digest, size)
            if self.tier is None:
                spool.unlink(missing_ok=True)
                final = self.path(digest)
            else:
                final, size = await loop.run_in_executor(None, self.place, spool, digest)
                self.tier.admit(digest, size)
            self.usage.record_blob(digest, size)
            await self.usage.flush()  # visible to every replica before anyone is told
            return final
        final, size = await loop.run_in_executor(None, self.place, spool, digest)
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

    def remove(self, digest: str) -> Awaitable[None] | None:
        """Delete a blob's file (its ledger entry is the caller's: Metadata.evict/forget);
        with S3, also its object: the deletion to await is returned."""
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass
        if self.remote is None:
            return None
        if self.tier is not None:
            self.tier.forget(digest)
        self._remote_sizes.pop(digest, None)
        # The ledger's digest may be a blob's or a manifest's (index.py keeps a copy of each
        # manifest): deleting a key that does not exist costs nothing.
        algorithm, _, encoded = digest.partition(":")
        return self.remote.delete_many([self.object_name(digest),
                                        f"manifests/{algorithm}/{encoded}"])

    def forget_remote(self, digest: str) -> None:
        """Another replica removed the object (a read found it gone)."""
        self._remote_sizes.pop(digest, None)


def _size_of(path: Path) -> int:
    return os.stat(path).st_size


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
