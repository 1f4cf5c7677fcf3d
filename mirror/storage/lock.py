"""ServerLock: a running server's claim on its storage root, so `mirror gc` can tell.

    <root>/server.lock   flock()ed (shared) by every server process on this root

The spool files in <root>/tmp/ belong to the server that writes them: a fill in progress,
or a broken-off download kept for resuming however old it is. `mirror gc` run beside a
live server must not touch them; it asks `held()` and leaves tmp/ to the server, which
empties it at its next start. The lock goes with the process, `kill -9` included.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class ServerLock:
    def __init__(self, root: str | Path):
        path = Path(root) / "server.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def held(root: str | Path) -> bool:
    """Whether a server process holds `root` now."""
    path = Path(root) / "server.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our probe lock, if we got it
    return False
