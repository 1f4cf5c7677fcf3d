"""A digest computed on a thread of its own, in order, over a ring of reused buffers.

The pump thread of a cold fill (fill.py) reads the socket and writes the spool; hashing
the same bytes there too made the three one chain, and sha256 alone is about half of it
(~1.4 GB/s here). Handing each chunk to a second thread lets the hash of chunk N run while
chunk N+1 is received and written, on the machine's other core. The chunk's buffer comes
back to the ring only once it was hashed, so the pump never overwrites bytes still to be
hashed, and waits (back-pressure) when the hash falls `depth` chunks behind.
"""

from __future__ import annotations

import queue
import threading
from typing import Any


class BackgroundHash:
    def __init__(self, hasher: Any, size: int, depth: int, name: str):
        self.hasher = hasher
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(bytearray(size))
        self._work: queue.SimpleQueue[tuple[memoryview, bytearray | None] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def buffer(self) -> bytearray:
        """A buffer to read the next chunk into; waits while every one is being hashed."""
        return self._free.get()

    def update(self, data: memoryview, buffer: bytearray | None = None) -> None:
        """Hash `data` after everything before it; `buffer` (holding it) then goes back to
        the ring. Without a buffer, `data` must not change afterwards."""
        self._work.put((data, buffer))

    def close(self) -> None:
        """Wait until everything handed over is hashed: `hasher` then covers exactly it."""
        self._work.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            data, buffer = item
            try:
                self.hasher.update(data)  # releases the GIL for chunks over 2 KiB
            finally:
                if buffer is not None:
                    self._free.put(buffer)
