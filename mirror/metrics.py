"""Every metric in one place, and its Prometheus text rendering (exposition format 0.0.4).

The metrics are process-wide module globals, as in prometheus_client's default registry:
code anywhere does `metrics.CACHE_HITS.inc(1, "blob")`, and `GET /metrics` (status.py)
renders them all. An increment is a dict update, never I/O: the manifest path runs it at
thousands of requests per second.

    mirror_http_requests_total{route,status}      responses, by route name and HTTP status
    mirror_cache_hits_total{kind}                 manifest / blob requests answered with no
                                                  upstream request
    mirror_cache_misses_total{kind}               ... that needed the upstream (coalesced too)
    mirror_coalesced_requests_total{kind}         misses that joined a fetch already running
    mirror_cache_bytes_total{kind}                body bytes sent to clients from the cache
    mirror_upstream_bytes_total{upstream}         body bytes received from each upstream
    mirror_upstream_requests_total{upstream}      requests sent to each upstream
    mirror_upstream_errors_total{upstream}        of those, failed: unreachable, 5xx, 429,
                                                  a body that broke off
    mirror_upstream_rate_limited_total{upstream}  of those, answered 429
    mirror_fill_duration_seconds                  histogram of blob fills, start to commit
    mirror_fills_failed_total                     blob fills that stored nothing
    mirror_fills_in_progress                      gauge, set when /metrics is read
    mirror_disk_used_bytes, mirror_disk_budget_bytes
                                                  gauges read through `set_disk` callbacks;
                                                  until some code registers them, the budget
                                                  is reported as 0 and the use is left out
                                                  (walking the blob tree per scrape is too
                                                  slow for a large cache)
    mirror_evictions_total, mirror_evicted_bytes_total
                                                  what the disk budget removed

Blob hits and misses count GETs, by whether the blob was committed; a miss that finds the
fill of its digest running is coalesced. Manifest hits and misses (GET and HEAD) are told
apart without touching the cache policy: the manifest handler keeps a `Lookup` open for
(repository, reference) while the proxy answers, and `Upstream.open` reports each request
for that manifest. A lookup that saw one is a miss; when several lookups of the same
reference shared one upstream request, all but one are coalesced.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from bisect import bisect_left
from operator import itemgetter
from typing import Callable, Iterator

from aiohttp import web

log = logging.getLogger("mirror")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STARTED = time.time()

Sample = tuple[str, dict[str, str], float]  # (name suffix, labels, value)

REGISTRY: list[Metric] = []


class Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name = name
        self.help = help
        self.labels = labels
        REGISTRY.append(self)

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError


class Counter(Metric):
    """A count that only goes up; `inc(amount, *label_values)`."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help, labels)
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1, *labels: object) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def value(self, *labels: object) -> float:
        return self.values.get(labels, 0)

    def total(self) -> float:
        return sum(self.values.values())

    def samples(self) -> Iterator[Sample]:
        if not self.labels and not self.values:
            yield "", {}, 0
        for key, value in sorted(self.values.items(), key=lambda kv: tuple(map(str, kv[0]))):
            yield "", dict(zip(self.labels, map(str, key))), value


class Gauge(Metric):
    """A value that goes up and down: set by `set`, or read from `function` when rendered."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (),
                 function: Callable[[], float | None] | None = None):
        super().__init__(name, help, labels)
        self.values: dict[tuple, float] = {}
        self.function = function

    def set(self, value: float, *labels: object) -> None:
        self.values[labels] = value

    def value(self, *labels: object) -> float | None:
        if self.function is not None and not labels:
            return self.function()
        return self.values.get(labels)

    def samples(self) -> Iterator[Sample]:
        if self.function is not None:
            try:
                value = self.function()
            except Exception:  # a broken callback must not break the scrape
                log.exception("metric %s: its callback failed", self.name)
                value = None
            if value is not None:
                yield "", {}, value
            return
        for key, value in sorted(self.values.items(), key=lambda kv: tuple(map(str, kv[0]))):
            yield "", dict(zip(self.labels, map(str, key))), value


class Histogram(Metric):
    """Observations counted into buckets by upper bound (`le`), plus their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # per bucket, the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self) -> Iterator[Sample]:
        cumulative = 0
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            cumulative += count
            yield "_bucket", {"le": _number(bound)}, cumulative
        yield "_sum", {}, self.sum
        yield "_count", {}, self.count


REQUESTS = Counter("mirror_http_requests_total",
                   "HTTP responses, by route name and status.", ("route", "status"))
CACHE_HITS = Counter("mirror_cache_hits_total",
                     "Manifest and blob requests answered without any upstream request.",
                     ("kind",))
CACHE_MISSES = Counter("mirror_cache_misses_total",
                       "Manifest and blob requests that needed the upstream, coalesced ones "
                       "included.", ("kind",))
COALESCED = Counter("mirror_coalesced_requests_total",
                    "Cache misses that joined a fetch of the same content already running "
                    "instead of starting one.", ("kind",))
CACHE_BYTES = Counter("mirror_cache_bytes_total",
                      "Body bytes sent to clients from the cache (hits).", ("kind",))
UPSTREAM_BYTES = Counter("mirror_upstream_bytes_total",
                         "Body bytes received from each upstream.", ("upstream",))
UPSTREAM_REQUESTS = Counter("mirror_upstream_requests_total",
                            "Requests sent to each upstream.", ("upstream",))
UPSTREAM_ERRORS = Counter("mirror_upstream_errors_total",
                          "Upstream requests that failed: unreachable, 5xx, 429, a body that "
                          "broke off.", ("upstream",))
UPSTREAM_RATE_LIMITED = Counter("mirror_upstream_rate_limited_total",
                                "Upstream answers 429 Too Many Requests.", ("upstream",))
FILL_SECONDS = Histogram("mirror_fill_duration_seconds",
                         "Blob fills from the first upstream request to the commit.",
                         (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
FILLS_FAILED = Counter("mirror_fills_failed_total", "Blob fills that stored nothing.")
FILLS_IN_PROGRESS = Gauge("mirror_fills_in_progress", "Blob fills running now.")
DISK_USED = Gauge("mirror_disk_used_bytes",
                  "Bytes the cache uses on disk; absent until the disk budget reports it.")
DISK_BUDGET = Gauge("mirror_disk_budget_bytes",
                    "The disk budget in bytes; 0 when none is configured or reported.",
                    function=lambda: 0)
CLUSTER_FILLS = Counter("mirror_cluster_fills_total",
                        "Blob fills started by this replica, by its part: holder (fetched from "
                        "the upstream for the cluster), follower (streamed from the holder), "
                        "alone (Redis did not answer: fetched without a lease).", ("role",))
CLUSTER_TAKEOVERS = Counter("mirror_cluster_takeovers_total",
                            "Fills this replica went on with after their holder died or stalled.")
CLUSTER_LEASE_FAILURES = Counter("mirror_cluster_lease_failures_total",
                                 "Fill leases not taken because Redis did not answer.")
PEER_STREAMS = Counter("mirror_cluster_peer_streams_total",
                       "Fills this replica streamed to other replicas.")
EVICTIONS = Counter("mirror_evictions_total", "Blobs and manifests evicted by the disk budget.")
EVICTED_BYTES = Counter("mirror_evicted_bytes_total", "Bytes evicted by the disk budget.")


def set_disk(used: Callable[[], float | None], budget: Callable[[], float | None]) -> None:
    """Register the callbacks the disk gauges read at each scrape (cheap: no tree walks)."""
    DISK_USED.function = used
    DISK_BUDGET.function = lambda: budget() or 0  # no budget: 0, as documented above


def disk() -> tuple[float | None, float | None]:
    """(bytes used, budget bytes), None when not reported; for the status page."""
    return DISK_USED.value(), DISK_BUDGET.value() or None


def render() -> str:
    lines = []
    for metric in REGISTRY:
        lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for suffix, labels, value in metric.samples():
            lines.append(f"{metric.name}{suffix}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in labels.items()) + "}"


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


# Manifest lookups: hit, miss or coalesced (see the module docstring).
class _Shared:
    """The lookups of one (repository, reference) open now."""

    __slots__ = ("key", "users", "asks", "unclaimed")

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key
        self.users = 0      # lookups open
        self.asks = 0       # upstream requests for this manifest while any was open
        self.unclaimed = 0  # of those, not yet counted as some lookup's own miss


class Lookup:
    """One manifest request, from `start_lookup` to `finish_lookup`."""

    __slots__ = ("shared", "seen", "busy")


_lookups: dict[tuple[str, str], _Shared] = {}


def start_lookup(repository: str, reference: str) -> Lookup:
    """`repository` as reference.Route.key names it: "<upstream>/<name>"."""
    key = (repository, reference)
    shared = _lookups.get(key)
    if shared is None:
        shared = _lookups[key] = _Shared(key)
    shared.users += 1
    lookup = Lookup()
    lookup.shared, lookup.seen, lookup.busy = shared, shared.asks, shared.unclaimed > 0
    return lookup


def finish_lookup(lookup: Lookup) -> bool:
    """Count the request as a hit, a miss or a coalesced miss; True for a hit."""
    shared = lookup.shared
    shared.users -= 1
    if not shared.users:
        del _lookups[shared.key]
    if not lookup.busy and shared.asks == lookup.seen:
        CACHE_HITS.inc(1, "manifest")
        return True
    # It waited for an upstream request: the first to finish counts as the one that asked
    # (the totals are what matter), every other one as coalesced.
    CACHE_MISSES.inc(1, "manifest")
    if shared.unclaimed:
        shared.unclaimed -= 1
    else:
        COALESCED.inc(1, "manifest")
    return False


def upstream_request(upstream: str, name: str, path: str) -> None:
    """Called by Upstream.open for every request it sends (`name` as the upstream knows it)."""
    UPSTREAM_REQUESTS.inc(1, upstream)
    _, manifests, reference = path.rpartition("/manifests/")
    if manifests:
        shared = _lookups.get((f"{upstream}/{name}", reference))
        if shared is not None:
            shared.asks += 1
            shared.unclaimed += 1


# Busiest repositories, for the status page (not a metric: unbounded label values would
# make every scrape grow with the number of repositories ever seen).
class Tally:
    """Approximate request counts per key in bounded memory: past `limit` keys, only the
    busiest half is kept, so a stream of one-off names never grows it."""

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.counts: dict[str, int] = {}

    def add(self, key: str) -> None:
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        if len(counts) > self.limit:
            self.counts = dict(heapq.nlargest(self.limit // 2, counts.items(),
                                              key=itemgetter(1)))

    def top(self, n: int = 10) -> list[tuple[str, int]]:
        return heapq.nlargest(n, self.counts.items(), key=itemgetter(1))


REPOSITORIES = Tally()

# The name each handler's requests are counted under; routes.setup fills it in.
ROUTE_NAMES: dict[Callable, str] = {}
# A request key marking a blob cache hit: its body size (Range) is known only when the
# response is prepared, and counted then.
CACHE_HIT = web.RequestKey("cache_hit", bool)


async def on_response_prepare(request, response) -> None:
    """Count every response by route and status; add a cache hit's bytes."""
    route = ROUTE_NAMES.get(request.match_info.handler, "other")
    REQUESTS.inc(1, route, response.status)
    if route == "blob" and request.get(CACHE_HIT) and request.method != "HEAD" \
            and response.content_length:
        CACHE_BYTES.inc(response.content_length, "blob")
