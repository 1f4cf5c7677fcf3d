"""The status page's newer panels, each as HTML and as the JSON /status.json carries: the
trends (charts of ops/trends.py's rings) and "Denials and failures" (the access policy's
refusals and failed pulls from ops/events.py, merged with the pull rules', signature
rules' and scanner's own latest denials, newest first).
"""

from __future__ import annotations

from html import escape
from typing import Callable

from aiohttp import web

from .. import metrics
from ..keys import POLICY, SCANNER, SIGNATURES, TRENDS
from ..ops.events import LIMIT, Denial
from ..ops.trends import Ring
from . import charts

RANGES = {"hour": "last hour", "day": "last 24 h"}
BLUE, GREEN, ORANGE, RED, GREY = "#2f6fde", "#1f8a4c", "#b86e00", "#c4302b", "#5b6b7c"


# Trends.
def ring(app: web.Application, range_: str) -> Ring:
    trends = app[TRENDS]
    return trends.day if range_ == "day" else trends.hour


def trends_html(app: web.Application, range_: str, now: float,
                size: Callable[[float], str]) -> str:
    """Five small charts over the ring's window: an hour or a day, or since the first point
    while the mirror is younger than that (so a fresh start is not squeezed to the edge)."""
    shown = ring(app, range_)
    points = list(shown.points)
    start = now - shown.span
    if points:
        start = max(start, points[0].at - shown.step)
    window = f"last {_seconds(round(now - start))}" if points else ""

    def series(field: str) -> list[tuple[float, float | None]]:
        return [(p.at, getattr(p, field)) for p in points]

    def per_second(n: float) -> str:
        return f"{n:.1f}/s" if n < 100 else f"{n:,.0f}/s"

    def count(n: float) -> str:
        return f"{n:,.0f}"

    step = shown.step
    figures = [
        charts.chart("requests per second", [charts.Line("requests", BLUE, series("requests"))],
                     start, now, per_second, window=window),
        charts.chart("hit ratio", [charts.Line("hit ratio", GREEN, series("hit_ratio"))],
                     start, now, lambda r: f"{r * 100:.0f}%", maximum=1.0, window=window),
        charts.chart("bytes per second", [
            charts.Line("from cache", GREEN, series("cache_bytes")),
            charts.Line("from upstream", ORANGE, series("upstream_bytes"))],
            start, now, lambda n: f"{size(n)}/s", window=window),
        charts.chart(f"upstream errors per {_seconds(step)}", [
            charts.Line("errors", RED, series("upstream_errors")),
            charts.Line("429s", ORANGE, series("rate_limited"))], start, now, count,
            window=window),
        charts.chart("fills in flight", [charts.Line("fills", GREY, series("fills"))],
                     start, now, count, window=window),
    ]
    links = " · ".join(f"<b>{label}</b>" if key == range_ else
                       f'<a href="?range={key}">{label}</a>' for key, label in RANGES.items())
    note = (f'<p class="empty"><small>{len(points)} points, one every {_seconds(step)}; '
            f"{links}</small></p>")
    return f'<div class="charts">{"".join(figures)}</div>{note}'


def trends_data(app: web.Application) -> dict:
    trends = app[TRENDS]
    return {"hour": trends.hour.document(), "day": trends.day.document()}


def _seconds(step: float) -> str:
    if step >= 3600 and step % 3600 == 0:
        return f"{step / 3600:.0f} h"
    if step >= 60 and step % 60 == 0:
        return f"{step / 60:.0f} min"
    if step >= 120:
        return f"{step / 60:.0f} min"
    return f"{step:g} s"


# Denials and failures.
def denials(app: web.Application) -> list[Denial]:
    """The latest denials of every kind, newest first, at most LIMIT."""
    merged = list(app[metrics.METRICS].events.denials)
    for kind, source in (("policy", app[POLICY]), ("signature", app[SIGNATURES]),
                         ("scanner", app[SCANNER])):
        merged += [Denial(d.at, kind, "-", d.client, d.subject, d.rule) for d in source.recent]
    merged.sort(key=lambda d: -d.at)
    return merged[:LIMIT]


def denials_data(app: web.Application) -> dict:
    return {"denials": [d.document() for d in denials(app)],
            "failures": [f.document() for f in app[metrics.METRICS].events.failures]}


def denials_html(app: web.Application, clock: Callable[[float], str],
                 table: Callable[[tuple[str, ...], list[str], str], str]) -> str:
    denied = [f'<tr><td class="nowrap">{escape(clock(d.at))}</td><td>{escape(d.kind)}</td>'
              f"<td>{escape(d.user)}</td><td>{escape(d.client)}</td>"
              f"<td><code>{escape(d.subject)}</code></td><td>{escape(d.reason)}</td></tr>"
              for d in denials(app)]
    failed = [f'<tr><td class="nowrap">{escape(clock(f.at))}</td><td class="n">{f.status}</td>'
              f"<td>{escape(f.upstream)}</td><td><code>{escape(f.repository)}</code></td>"
              f"<td><code>{escape(f.reference)}</code></td><td>{escape(f.message)}</td></tr>"
              for f in app[metrics.METRICS].events.failures]
    return ("<h3>Denied</h3>"
            + table(("time", "by", "user", "client", "image", "rule or reason"), denied,
                    "Nothing denied yet.")
            + "<h3>Failed pulls</h3>"
            + table(("time", "status", "upstream", "repository", "reference", "reason"), failed,
                    "No pull has failed."))
