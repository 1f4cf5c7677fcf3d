"""Small line charts as inline SVG, drawn by the server: no JavaScript, no chart library, no
CDN, so the status page works air-gapped and in any browser.

`chart(title, lines, start, end, fmt, window=...)` draws one or more series over the window
[start, end] (seconds since the epoch): each `Line` is a `<path>` whose `d` holds the real
coordinates of its points (x by time, y by value against the chart's maximum), a gap where a
value is None (a hit ratio with no requests) starting a new `M` segment. The axis maximum is
written at the top left, the window's length at the top right, each line's last value in
the legend. Everything that is text
goes through html.escape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Callable, Sequence

WIDTH, HEIGHT = 320, 90  # the drawing's own units; the page scales it to the card
TOP, BOTTOM = 14, 4      # room for the maximum's label, and below the lowest line


@dataclass(frozen=True)
class Line:
    label: str
    colour: str
    points: Sequence[tuple[float, float | None]]  # (time, value)


def nice_max(value: float) -> float:
    """The axis maximum: 1, 2 or 5 times a power of ten, at least `value` (1 for nothing)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 5, 10):
        if value <= factor * power:
            return factor * power
    return 10 * power


def path(points: Sequence[tuple[float, float | None]], start: float, end: float,
         top: float) -> str:
    """The `d` of one line: M/L commands in the drawing's coordinates."""
    span = max(end - start, 1e-9)
    commands, pen_down = [], False
    for at, value in points:
        if value is None:
            pen_down = False
            continue
        x = (min(max(at, start), end) - start) / span * WIDTH
        y = TOP + (1 - min(value / top, 1.0)) * (HEIGHT - TOP - BOTTOM)
        commands.append(f"{'L' if pen_down else 'M'}{x:.1f} {y:.1f}")
        pen_down = True
    return " ".join(commands)


def chart(title: str, lines: Sequence[Line], start: float, end: float,
          fmt: Callable[[float], str], maximum: float | None = None, window: str = "") -> str:
    """A `<figure>` with the chart and its legend (each line's last value)."""
    values = [v for line in lines for _, v in line.points if v is not None]
    top = maximum if maximum is not None else nice_max(max(values, default=0.0))
    drawn = "".join(
        f'<path class="series" data-series="{escape(line.label)}" fill="none" '
        f'stroke="{escape(line.colour)}" stroke-width="1.5" stroke-linejoin="round" '
        f'd="{path(line.points, start, end, top)}"/>' for line in lines)
    legend = " ".join(
        f'<span class="key"><i style="background:{escape(line.colour)}"></i>'
        f"{escape(line.label)} <b>{escape(_last(line, fmt))}</b></span>" for line in lines)
    grid = (f'<line x1="0" y1="{TOP}" x2="{WIDTH}" y2="{TOP}" class="grid"/>'
            f'<line x1="0" y1="{HEIGHT - BOTTOM}" x2="{WIDTH}" y2="{HEIGHT - BOTTOM}" '
            'class="grid"/>')
    return (f'<figure class="chart"><figcaption>{escape(title)}</figcaption>'
            f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-label="{escape(title)}">{grid}'
            f'<text x="2" y="10" class="axis">max {escape(fmt(top))}</text>'
            f'<text x="{WIDTH - 2}" y="10" text-anchor="end" class="axis">{escape(window)}</text>'
            f"{drawn}</svg>"
            f"<p>{legend}</p></figure>")


def _last(line: Line, fmt: Callable[[float], str]) -> str:
    value = next((v for _, v in reversed(line.points) if v is not None), None)
    return "—" if value is None else fmt(value)
