"""Every metric of one application, kept and rendered by prometheus_client.

Each application owns one `Metrics` (make_app stores it under METRICS): its own
`prometheus_client.CollectorRegistry` holding the counters, gauges and the histogram below,
so two applications in one process (tests, benchmarks) never see each other's counts. The
code that counts is handed the object (Upstream, Fills, Budget, FillLeases) or reads it
from the request's application (handlers). An increment is a lock and an addition, never
I/O: the manifest path runs it at thousands of requests per second. docs/metrics.md lists
each metric with its type, labels and meaning, and tests/test_metrics.py holds the two to
each other. Live values (fills running, disk use) are read when /metrics is scraped. Beside
the metrics it keeps two bounded things only the status page reads: the busiest
repositories (`Tally`) and the latest refused logins and failed pulls (ops/events.py;
`on_response_prepare` lists a pull answered 429 or 5xx there, with the error's message).

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
import time
from operator import itemgetter
from typing import Callable, Iterator, NamedTuple

import prometheus_client
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .ops.events import Events, error_message, is_failure

log = logging.getLogger("mirror")

# `_created` samples (the time each series began) would double the exposition for nothing a
# dashboard of this mirror reads; the switch is prometheus_client's and process-wide.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
FILL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
KINDS = ("manifest", "blob")
ROLES = ("holder", "follower", "alone")


class UpstreamCounts(NamedTuple):
    """One upstream's series, bound once: its requests count them on every chunk."""

    requests: Counter
    errors: Counter
    rate_limited: Counter
    bytes: Counter


class Metrics:
    """The metrics of one application, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.started = time.time()  # for the status page's uptime
        self.requests = Counter("mirror_http_requests_total",
                                "HTTP responses, by route name and status.",
                                ("route", "status"), registry=r)
        self.cache_hits = Counter("mirror_cache_hits_total", "Manifest and blob requests "
                                  "answered without any upstream request.", ("kind",), registry=r)
        self.cache_misses = Counter("mirror_cache_misses_total", "Manifest and blob requests "
                                    "that needed the upstream, coalesced ones included.",
                                    ("kind",), registry=r)
        self.coalesced = Counter("mirror_coalesced_requests_total", "Cache misses that joined "
                                 "a fetch of the same content already running instead of "
                                 "starting one.", ("kind",), registry=r)
        self.cache_bytes = Counter("mirror_cache_bytes_total",
                                   "Body bytes sent to clients from the cache (hits).",
                                   ("kind",), registry=r)
        self.upstream_bytes = Counter("mirror_upstream_bytes_total",
                                      "Body bytes received from each upstream.", ("upstream",),
                                      registry=r)
        self.upstream_requests = Counter("mirror_upstream_requests_total",
                                         "Requests sent to each upstream.", ("upstream",),
                                         registry=r)
        self.upstream_errors = Counter("mirror_upstream_errors_total", "Upstream requests that "
                                       "failed: unreachable, 5xx, 429, a body that broke off.",
                                       ("upstream",), registry=r)
        self.upstream_rate_limited = Counter("mirror_upstream_rate_limited_total",
                                             "Upstream answers 429 Too Many Requests.",
                                             ("upstream",), registry=r)
        self.fill_seconds = Histogram("mirror_fill_duration_seconds",
                                      "Blob fills from the first upstream request to the commit.",
                                      buckets=FILL_BUCKETS, registry=r)
        self.fills_failed = Counter("mirror_fills_failed_total",
                                    "Blob fills that stored nothing.", registry=r)
        self.fills_in_progress = Gauge("mirror_fills_in_progress", "Blob fills running now.",
                                       registry=r)
        self.disk = Disk()
        r.register(self.disk)
        self.cluster_fills = Counter(
            "mirror_cluster_fills_total", "Blob fills started by this replica, by its part: "
            "holder (fetched from the upstream for the cluster), follower (streamed from the "
            "holder), alone (Redis did not answer: fetched without a lease).", ("role",),
            registry=r)
        self.cluster_takeovers = Counter(
            "mirror_cluster_takeovers_total",
            "Fills this replica went on with after their holder died or stalled.", registry=r)
        self.cluster_lease_failures = Counter(
            "mirror_cluster_lease_failures_total",
            "Fill leases not taken because Redis did not answer.", registry=r)
        self.peer_streams = Counter("mirror_cluster_peer_streams_total",
                                    "Fills this replica streamed to other replicas.", registry=r)
        self.evictions = Counter("mirror_evictions_total",
                                 "Blobs and manifests evicted by the disk budget.", registry=r)
        self.evicted_bytes = Counter("mirror_evicted_bytes_total",
                                     "Bytes evicted by the disk budget.", registry=r)
        self.policy_decisions = Counter(
            "mirror_policy_decisions_total", "Pull requests decided by [[policy.rules]], by "
            "rule (\"rules[0]\"; \"none\" when no rule applied) and decision (allowed, "
            "denied). An allowed request counts for each rule that applied to it.",
            ("rule", "decision"), registry=r)
        self.signature_verdicts = Counter(
            "mirror_signature_verdicts_total", "Manifest requests judged by "
            "[[policy.signatures]], by rule (\"signatures[0]\"), verdict (signed, unsigned, "
            "invalid) and the rule's mode (enforce, warn, audit).",
            ("rule", "verdict", "mode"), registry=r)
        self.scan_verdicts = Counter(
            "mirror_scan_verdicts_total", "Manifest requests decided by the scanner gate "
            "(policy.scan_webhook), by verdict: allowed, denied, error (the webhook failed; "
            "served or not by policy.scan_fail_closed), pending (503 while a scan runs).",
            ("verdict",), registry=r)
        # CPU, memory and descriptors of the process (process_*), as the default registry
        # of prometheus_client would have them.
        ProcessCollector(registry=r)
        # Series that exist from the start, so rate() sees their first increment.
        for kind in KINDS:
            for counter in (self.cache_hits, self.cache_misses, self.coalesced,
                            self.cache_bytes):
                counter.labels(kind)
        for role in ROLES:
            self.cluster_fills.labels(role)
        # Bound series for the hottest paths: `labels()` costs ~4 us, `inc()` on a bound
        # series ~1 us, and every response and manifest lookup counts.
        self._responses: dict[tuple[str, int], Counter] = {}
        self._manifest = (self.cache_hits.labels("manifest"),
                          self.cache_misses.labels("manifest"),
                          self.coalesced.labels("manifest"))
        self.repositories = Tally()
        # The latest refused logins and failed pulls, for the status page (ops/events.py).
        self.events = Events()
        self._lookups: dict[tuple[str, str], _Shared] = {}

    def exposition(self) -> bytes:
        """The text format of every metric, as `GET /metrics` answers it."""
        return prometheus_client.generate_latest(self.registry)

    def upstream(self, name: str) -> UpstreamCounts:
        """The series of upstream `name`, created at zero."""
        return UpstreamCounts(self.upstream_requests.labels(name),
                              self.upstream_errors.labels(name),
                              self.upstream_rate_limited.labels(name),
                              self.upstream_bytes.labels(name))

    def set_disk(self, used: Callable[[], float | None],
                 budget: Callable[[], float | None]) -> None:
        """Register what the disk gauges read at each scrape (cheap: no tree walks)."""
        self.disk.used, self.disk.budget = used, budget

    async def on_response_prepare(self, request: web.Request,
                                  response: web.StreamResponse) -> None:
        """Count every response by route and status; add a cache hit's bytes."""
        key = (ROUTE_NAMES.get(request.match_info.handler, "other"), response.status)
        series = self._responses.get(key)
        if series is None:  # a few routes times a few statuses: it stays small
            series = self._responses[key] = self.requests.labels(*key)
        series.inc()
        route = key[0]
        if route == "blob" and request.get(CACHE_HIT) and request.method != "HEAD" \
                and response.content_length:
            self.cache_bytes.labels("blob").inc(response.content_length)
        elif is_failure(route, response.status):
            self._failed(request, response)

    def _failed(self, request: web.Request, response: web.StreamResponse) -> None:
        """A pull answered 429 or 5xx: kept with its upstream and the message the client
        got (the upstream's own reason, as upstream/client.py words it)."""
        from .keys import ROUTER  # keys imports the modules that import this one

        info = request.match_info
        name = info.get("name", "")
        try:
            target = request.app[ROUTER].route(name, ns=request.query.get("ns"),
                                               prefix=info.get("prefix"))
            upstream, name = target.upstream.name, target.name  # library/ added for Hub
        except Exception:  # an unknown name or ns: the failure is listed all the same
            upstream = "-"
        message = error_message(getattr(response, "body", None)) or response.reason or ""
        self.events.failed(response.status, upstream, name,
                           info.get("reference") or info.get("digest") or "", message)

    # Manifest lookups: hit, miss or coalesced (see the module docstring).
    def start_lookup(self, repository: str, reference: str) -> Lookup:
        """`repository` as reference.Route.key names it: "<upstream>/<name>"."""
        key = (repository, reference)
        shared = self._lookups.get(key)
        if shared is None:
            shared = self._lookups[key] = _Shared(key)
        shared.users += 1
        lookup = Lookup()
        lookup.shared, lookup.seen, lookup.busy = shared, shared.asks, shared.unclaimed > 0
        return lookup

    def finish_lookup(self, lookup: Lookup) -> bool:
        """Count the request as a hit, a miss or a coalesced miss; True for a hit."""
        shared = lookup.shared
        shared.users -= 1
        if not shared.users:
            del self._lookups[shared.key]
        if not lookup.busy and shared.asks == lookup.seen:
            self._manifest[0].inc()
            return True
        # It waited for an upstream request: the first to finish counts as the one that
        # asked (the totals are what matter), every other one as coalesced.
        self._manifest[1].inc()
        if shared.unclaimed:
            shared.unclaimed -= 1
        else:
            self._manifest[2].inc()
        return False

    def upstream_request(self, upstream: str, name: str, path: str) -> None:
        """Called by Upstream.open for every request it sends (`name` as the upstream
        knows it)."""
        self.upstream_requests.labels(upstream).inc()
        _, manifests, reference = path.rpartition("/manifests/")
        if manifests:
            shared = self._lookups.get((f"{upstream}/{name}", reference))
            if shared is not None:
                shared.asks += 1
                shared.unclaimed += 1


class Disk(Collector):
    """mirror_disk_used_bytes and mirror_disk_budget_bytes, read from callbacks at each
    scrape. Until the budget registers them the budget is 0 and the use is left out:
    walking the blob tree per scrape is too slow for a large cache."""

    def __init__(self) -> None:
        self.used: Callable[[], float | None] = lambda: None
        self.budget: Callable[[], float | None] = lambda: None

    def read(self) -> tuple[float | None, float | None]:
        """(bytes used, budget bytes), None when not reported; for the status page too."""
        try:
            return self.used(), self.budget() or None
        except Exception:  # a broken callback must not break the scrape
            log.exception("the disk metrics' callback failed")
            return None, None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used, budget = self.read()
        yield _gauge("mirror_disk_used_bytes",
                     "Bytes the cache uses on disk; absent until the disk budget reports it.",
                     used)
        yield _gauge("mirror_disk_budget_bytes",
                     "The disk budget in bytes; 0 when none is configured or reported.",
                     budget or 0)

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("mirror_disk_used_bytes", ""),
                GaugeMetricFamily("mirror_disk_budget_bytes", "")]


def _gauge(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], value)
    return family


# Reading values back, for the status page: through the metric's own samples.
def total(metric: Counter) -> float:
    """The sum of a counter's series, every label value."""
    return sum(by_label(metric).values())


def value(metric: Counter, **labels: str) -> float:
    """One series of a counter; 0 when it was never counted."""
    return sum(sample.value for family in metric.collect() for sample in family.samples
               if sample.name.endswith("_total") and sample.labels == labels)


def by_label(metric: Counter, label: str | None = None) -> dict[str, float]:
    """A counter's values summed per value of `label` (None: all under "")."""
    sums: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.labels.get(label, "") if label else ""
                sums[key] = sums.get(key, 0.0) + sample.value
    return sums


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


METRICS = web.AppKey("metrics", Metrics)
# The name each handler's requests are counted under; routes.setup fills it in (the same
# handlers in every application, so one table for all).
ROUTE_NAMES: dict[Callable, str] = {}
# A request key marking a blob cache hit: its body size (Range) is known only when the
# response is prepared, and counted then.
CACHE_HIT = web.RequestKey("cache_hit", bool)
