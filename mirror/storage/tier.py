"""LocalTier: the bounded local copy of hot blobs each replica keeps when blobs live in S3.

With `storage.backend = "s3"` the object store holds the durable copy of every blob; a
replica's own disk holds only what was served lately, up to `storage.local_cache_size`
bytes, so a warm blob is sent by sendfile from a local file instead of through the
replica from S3. What is here is a copy: removing it loses nothing, so the bound is kept
by plain least-recently-used removal, per replica, without asking the cluster. (The
cluster-wide byte budget, which decides what leaves S3, is cache/budget.py's.)

Its clock is in memory and rebuilt from the files' mtimes at start: after a restart the
order is roughly right, which is all a cache of copies needs.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

log = logging.getLogger("mirror")


class LocalTier:
    def __init__(self, blobs: Path, limit: int, in_use: Callable[[str], bool] = lambda d: False):
        self.blobs = blobs
        self.limit = limit
        self.in_use = in_use  # a digest being sent now stays (unlinking it would be safe for
        # the open descriptor, but a reader that looked its size up and opens next would miss)
        self._files: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest use first
        self.bytes = 0

    def load(self) -> None:
        """Enter the blob files already on disk (on a worker thread at start), oldest first."""
        found = []
        for path in self.blobs.glob("*/*/*"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            found.append((stat.st_mtime, f"{path.parent.parent.name}:{path.name}", stat.st_size))
        for _, digest, size in sorted(found):
            self._files[digest] = size
            self.bytes += size
        self.trim()

    def admit(self, digest: str, size: int) -> None:
        """A blob just placed locally; older ones go when the tier is past its bound."""
        if digest not in self._files:
            self._files[digest] = size
            self.bytes += size
        self._files.move_to_end(digest)
        self.trim()

    def used(self, digest: str) -> None:
        if digest in self._files:
            self._files.move_to_end(digest)

    def forget(self, digest: str) -> None:
        size = self._files.pop(digest, None)
        if size is not None:
            self.bytes -= size

    def trim(self) -> None:
        for digest in list(self._files):
            if self.bytes <= self.limit:
                return
            if self.in_use(digest):
                continue
            size = self._files.pop(digest)
            self.bytes -= size
            algorithm, _, encoded = digest.partition(":")
            try:
                os.unlink(self.blobs / algorithm / encoded[:2] / encoded)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove the local copy of %s: %s", digest, e.strerror)
