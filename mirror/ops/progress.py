"""Progress of the long operator commands (prefetch, export, import) on standard error.

On a terminal one status line is redrawn in place, at most ten times a second so that a fast
copy does not spend its time printing; events (an image done, a failure) are printed above
it. Anywhere else (a CI log, a pipe) there is no status line, only the events, one plain
line each, because carriage returns make a log unreadable.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

REDRAW_SECONDS = 0.1
BAR_WIDTH = 24


class Progress:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._drawn = 0.0
        self._line = ""

    def status(self, line: str, force: bool = False) -> None:
        """Redraw the status line (terminal only), unless it was drawn a moment ago."""
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._drawn < REDRAW_SECONDS:
            return
        self._drawn, self._line = now, line
        width = max(20, shutil.get_terminal_size().columns - 1)
        self.stream.write("\r\x1b[K" + line[:width])
        self.stream.flush()

    def event(self, line: str) -> None:
        """A line that stays: printed above the status line, which is then drawn again."""
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(line + "\n")
        if self.tty and self._line:
            self.stream.write(self._line)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self._line = ""


def bar(done: int, total: int) -> str:
    filled = BAR_WIDTH if total <= 0 else min(BAR_WIDTH, BAR_WIDTH * done // total)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"
