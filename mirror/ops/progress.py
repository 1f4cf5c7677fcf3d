"""Progress of the long operator commands (prefetch, export, import).

On a terminal one status line is redrawn in place on standard error, at most ten times a
second so that a fast copy does not spend its time printing. Events (an image done, a
failure) are output, not progress: they go to standard output, each flushed as it happens,
like the summary the command prints last — so `mirror prefetch ... | tee log` and
`> log 2>&1` carry the per-image lines and then the summary, in that order. (With events on
standard error and the summary on standard output, a reader of the two pipes could see the
summary first, and the stdout pipe alone had no per-image lines at all.) On a terminal the
status line is cleared before an event is printed and drawn again below it. Anywhere else
there is no status line, because carriage returns make a log unreadable.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

REDRAW_SECONDS = 0.1
BAR_WIDTH = 24


class Progress:
    def __init__(self, stream: TextIO | None = None, out: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.out = out or sys.stdout
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
        """A line of output that stays: printed above the status line, drawn again below."""
        if self.tty and self._line:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.out.write(line + "\n")
        self.out.flush()
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
