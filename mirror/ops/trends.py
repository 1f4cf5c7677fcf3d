"""Trends for the status page: the counters metrics.py keeps, sampled into two fixed-size
rings, so the page can draw the last hour and the last day without a time-series database.

Every `step` seconds (10 s) the sampler reads the counters' totals and appends one `Point`
to the hour ring (360 points); every `coarse_step` seconds (5 min) one to the day ring
(288 points). A point holds what changed since the ring's previous reading, over the time
that passed:

    requests         registry requests per second (the status page, /metrics and the
                     probes are not counted: a page left open must not draw its own traffic)
    hit_ratio        cache hits / (hits + misses) of manifests and blobs; None when there
                     was neither
    cache_bytes      body bytes per second served from the cache
    upstream_bytes   body bytes per second received from the upstreams
    upstream_errors  upstream requests that failed (429s included), in the interval
    rate_limited     upstream 429 answers, in the interval
    fills            blob fills running at the moment of the sample (a gauge, not a delta)

A counter that went down (a new Metrics) is read as a restart: the interval counts from 0.
Memory is bounded by the rings' lengths whatever the traffic. `Trends.retime(step,
coarse_step)` changes the steps of a running sampler (tests use a fraction of a second);
make_app stores the sampler under keys.TRENDS and runs it with the application.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import AsyncIterator

from .. import metrics

STEP = 10.0          # seconds between points of the hour ring
COARSE_STEP = 300.0  # seconds between points of the day ring
POINTS = 360         # one hour at STEP
COARSE_POINTS = 288  # one day at COARSE_STEP
# The routes a client's registry traffic is counted under (metrics.ROUTE_NAMES).
REGISTRY_ROUTES = frozenset(("ping", "catalog", "tags", "manifest", "blob", "upload",
                             "referrers", "token"))
SERIES = ("requests", "hit_ratio", "cache_bytes", "upstream_bytes", "upstream_errors",
          "rate_limited", "fills")


@dataclass(frozen=True)
class Reading:
    """The counters' totals at one moment."""

    at: float
    requests: float
    hits: float
    misses: float
    cache_bytes: float
    upstream_bytes: float
    upstream_errors: float
    rate_limited: float
    fills: float


@dataclass(frozen=True)
class Point:
    """One interval of a ring, ending at `at` (seconds since the epoch)."""

    at: float
    seconds: float
    requests: float
    hit_ratio: float | None
    cache_bytes: float
    upstream_bytes: float
    upstream_errors: float
    rate_limited: float
    fills: float

    def document(self) -> dict:
        return asdict(self)


def read(app_metrics: metrics.Metrics, now: float) -> Reading:
    """The totals trends are computed from."""
    routes = metrics.by_label(app_metrics.requests, "route")
    fills = sum(s.value for family in app_metrics.fills_in_progress.collect()
                for s in family.samples)
    return Reading(
        at=now,
        requests=sum(n for route, n in routes.items() if route in REGISTRY_ROUTES),
        hits=metrics.total(app_metrics.cache_hits),
        misses=metrics.total(app_metrics.cache_misses),
        cache_bytes=metrics.total(app_metrics.cache_bytes),
        upstream_bytes=metrics.total(app_metrics.upstream_bytes),
        upstream_errors=metrics.total(app_metrics.upstream_errors),
        rate_limited=metrics.total(app_metrics.upstream_rate_limited),
        fills=fills)


def point(before: Reading, after: Reading) -> Point:
    """What changed from `before` to `after`, as rates and counts of the interval."""
    seconds = max(after.at - before.at, 1e-9)

    def delta(field: str) -> float:
        now, then = getattr(after, field), getattr(before, field)
        return now - then if now >= then else now  # went down: counting started again

    hits, misses = delta("hits"), delta("misses")
    return Point(
        at=after.at, seconds=seconds,
        requests=delta("requests") / seconds,
        hit_ratio=hits / (hits + misses) if hits + misses else None,
        cache_bytes=delta("cache_bytes") / seconds,
        upstream_bytes=delta("upstream_bytes") / seconds,
        upstream_errors=delta("upstream_errors"),
        rate_limited=delta("rate_limited"),
        fills=after.fills)


class Ring:
    """The points of one resolution: at most `size`, the oldest dropped first."""

    def __init__(self, step: float, size: int) -> None:
        self.step = step
        self.points: deque[Point] = deque(maxlen=size)
        self.last: Reading | None = None  # the reading the next point is counted from

    @property
    def size(self) -> int:
        return self.points.maxlen or 0

    @property
    def span(self) -> float:
        """The time the ring covers when full."""
        return self.step * self.size

    def due(self, now: float) -> bool:
        return self.last is None or now - self.last.at >= self.step * 0.999

    def add(self, reading: Reading) -> Point | None:
        """Count a point from the previous reading to this one (none for the first)."""
        before, self.last = self.last, reading
        if before is None:
            return None
        new = point(before, reading)
        self.points.append(new)
        return new

    def document(self) -> dict:
        return {"step": self.step, "size": self.size,
                "points": [p.document() for p in self.points]}


class Trends:
    """The hour and day rings of one application, and the task that fills them."""

    def __init__(self, app_metrics: metrics.Metrics, step: float = STEP,
                 coarse_step: float = COARSE_STEP, points: int = POINTS,
                 coarse_points: int = COARSE_POINTS) -> None:
        self.metrics = app_metrics
        self.hour = Ring(step, points)
        self.day = Ring(coarse_step, coarse_points)
        self._wake = asyncio.Event()

    @property
    def step(self) -> float:
        return self.hour.step

    def sample(self, now: float | None = None) -> Point | None:
        """Read the counters once; a point for each ring that is due. The hour's point."""
        now = time.time() if now is None else now
        reading = read(self.metrics, now)
        if self.day.due(now):
            self.day.add(reading)
        return self.hour.add(reading)

    def retime(self, step: float, coarse_step: float | None = None) -> None:
        """New steps, from the next sample on (the rings keep their lengths)."""
        self.hour.step = step
        if coarse_step is not None:
            self.day.step = coarse_step
        self._wake.set()

    async def running(self, app: object) -> AsyncIterator[None]:
        """A cleanup context: sample from the start until the application stops."""
        self.sample()
        task = asyncio.ensure_future(self._sample_forever())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _sample_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                # Woken by retime(): a test's short step applies now, not after 10 s.
                await asyncio.wait_for(self._wake.wait(), self.hour.step)
                continue
            except TimeoutError:
                pass
            self.sample()
