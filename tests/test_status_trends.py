"""The status page's trends, denials and failures, JSON twin and read rule: the sampler's
arithmetic on its own, then real traffic through a mirror with the test upstream (a real
Distribution behind the fault proxy), read back from /status.json."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from yarl import URL

from mirror import config as cfg
from mirror.api import charts
from mirror.api.status import public_url
from mirror.keys import TRENDS
from mirror.metrics import Metrics
from mirror.ops.trends import Trends
from tests.conftest import fetched
from tests.test_access_logins import cheap_bcrypt, write_htpasswd

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def get(http, url: str, **headers) -> tuple[int, bytes]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.read()


async def status_json(http, mirror, **headers) -> dict:
    async with http.get(f"{mirror.url}/status.json", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "application/json"
        return json.loads(await resp.read())


# -- the sampler's arithmetic ---------------------------------------------------------------

def test_a_point_is_the_counters_change_over_the_time_that_passed():
    m = Metrics()
    trends = Trends(m)
    assert trends.sample(now=1000.0) is None  # the first reading only starts the count
    for _ in range(30):
        m.requests.labels("manifest", 200).inc()
    m.requests.labels("status", 200).inc(7)  # the page itself is not traffic
    m.cache_hits.labels("blob").inc(3)
    m.cache_misses.labels("manifest").inc(1)
    m.cache_bytes.labels("blob").inc(5000)
    m.upstream_bytes.labels("docker.io").inc(2000)
    m.upstream_errors.labels("quay.io").inc(4)
    m.upstream_rate_limited.labels("quay.io").inc(2)
    m.fills_in_progress.set(2)
    p = trends.sample(now=1010.0)
    assert (p.at, p.seconds, p.requests, p.hit_ratio) == (1010.0, 10.0, 3.0, 0.75)
    assert (p.cache_bytes, p.upstream_bytes) == (500.0, 200.0)
    assert (p.upstream_errors, p.rate_limited, p.fills) == (4, 2, 2)
    quiet = trends.sample(now=1015.0)  # nothing happened: zero rates, no hit ratio at all
    assert (quiet.requests, quiet.hit_ratio, quiet.upstream_errors, quiet.fills) == \
        (0.0, None, 0, 2)


def test_a_counter_that_went_down_counts_from_zero():
    before, after = Metrics(), Metrics()
    before.cache_hits.labels("blob").inc(100)
    trends = Trends(before)
    trends.sample(now=0.0)
    trends.metrics = after  # a new Metrics: the totals start again
    after.cache_hits.labels("blob").inc(2)
    assert trends.sample(now=10.0).hit_ratio == 1.0
    assert list(trends.hour.points)[-1].requests == 0.0


def test_rings_keep_a_fixed_number_of_points_and_drop_the_oldest():
    m = Metrics()
    trends = Trends(m, step=10, coarse_step=60, points=5, coarse_points=3)
    for i in range(200):
        m.requests.labels("blob", 200).inc(i)
        trends.sample(now=10.0 * i)
    assert [p.at for p in trends.hour.points] == [1950.0, 1960.0, 1970.0, 1980.0, 1990.0]
    assert [p.at for p in trends.day.points] == [1860.0, 1920.0, 1980.0]  # every 6th
    assert trends.hour.points[-1].requests == 199 / 10
    # The day ring's point spans its own interval: 6 fine steps of traffic.
    assert trends.day.points[-1].requests == sum(range(193, 199)) / 60


def test_the_default_rings_hold_an_hour_and_a_day():
    trends = Trends(Metrics())
    assert (trends.hour.step, trends.hour.size, trends.hour.span) == (10.0, 360, 3600.0)
    assert (trends.day.step, trends.day.size, trends.day.span) == (300.0, 288, 86400.0)


def test_a_chart_path_holds_the_series_coordinates_with_gaps_for_no_value():
    d = charts.path([(0, 0.0), (50, 0.5), (75, None), (100, 1.0)], start=0, end=100, top=1.0)
    low, high = charts.HEIGHT - charts.BOTTOM, charts.TOP
    middle = (low + high) / 2
    assert d == f"M0.0 {low:.1f} L160.0 {middle:.1f} M320.0 {high:.1f}"
    assert (charts.nice_max(0), charts.nice_max(3), charts.nice_max(20), charts.nice_max(201)) \
        == (1.0, 5, 20, 500)


def test_upstream_urls_are_shown_without_their_credentials():
    assert public_url(URL("https://bot:t0ken@registry.example/v2")) == \
        "https://registry.example/v2"
    assert public_url(URL("https://registry.example")) == "https://registry.example"


# -- real traffic ---------------------------------------------------------------------------

async def test_trend_points_count_the_traffic_that_went_through(mirror, http, upstream):
    app = mirror.server.app
    trends = app[TRENDS]
    trends.retime(3600)  # no sample of its own during the test: this one decides when
    alpine = upstream.images["library/alpine"]
    layer = min(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    trends.sample()
    for _ in range(3):
        status, body = await get(http, f"{mirror.url}/v2/alpine/blobs/{layer}")
        assert (status, body) == (200, alpine.blobs[layer])
        while layer in mirror.proxy.fills.active:
            await asyncio.sleep(0.01)
    status, _ = await get(http, f"{mirror.url}/")  # the page: not counted as traffic
    assert status == 200
    point = trends.sample()
    size = len(alpine.blobs[layer])
    assert round(point.requests * point.seconds) == 3
    assert point.hit_ratio == 2 / 3  # one miss, then two hits
    assert round(point.cache_bytes * point.seconds) == 2 * size
    assert round(point.upstream_bytes * point.seconds) == size
    assert fetched(upstream, "GET", layer) == 1
    assert (point.upstream_errors, point.rate_limited) == (0, 0)

    document = await status_json(http, mirror)
    hour = document["trends"]["hour"]
    assert (hour["step"], hour["size"]) == (3600, 360)
    assert hour["points"][-1]["hit_ratio"] == 2 / 3
    assert document["cache"]["hits"] == 2 and document["cache"]["misses"] == 1


async def test_a_short_step_gives_several_points_in_seconds(mirror, http):
    trends = mirror.server.app[TRENDS]
    trends.retime(0.05, coarse_step=0.2)
    for _ in range(200):
        if len(trends.hour.points) >= 5 and len(trends.day.points) >= 2:
            break
        await asyncio.sleep(0.02)
    assert len(trends.hour.points) >= 5 and len(trends.day.points) >= 2
    times = [p.at for p in trends.hour.points]
    assert times == sorted(times) and len(set(times)) == len(times)


async def test_a_failed_pull_is_listed_with_its_upstream_status_and_reason(
        mirror, http, upstream):
    upstream.proxy.status(503, match="/manifests/", times=1)
    status, _ = await get(http, f"{mirror.url}/v2/quay.io/team/app/manifests/2.0", **ACCEPT)
    assert status == 503
    upstream.proxy.status(429, {"Retry-After": "30"}, match="/manifests/", times=1)
    status, _ = await get(http, f"{mirror.url}/v2/alpine/manifests/3.19", **ACCEPT)
    assert status == 429
    point = mirror.server.app[TRENDS].sample()
    assert (point.upstream_errors, point.rate_limited) == (2, 1)

    failures = (await status_json(http, mirror))["failures"]
    assert [(f["status"], f["upstream"], f["repository"], f["reference"]) for f in failures] \
        == [(429, "docker.io", "library/alpine", "3.19"), (503, "quay.io", "team/app", "2.0")]
    assert failures[0]["message"] == "upstream docker.io is rate limiting this mirror"
    assert failures[1]["message"] == "upstream quay.io answered 503 for team/app"
    html = (await get(http, f"{mirror.url}/"))[1].decode()
    assert "<td>quay.io</td><td><code>team/app</code></td><td><code>2.0</code></td>" \
        "<td>upstream quay.io answered 503 for team/app</td>" in html


async def test_a_pull_rule_denial_is_listed_with_the_repository_and_the_rule(
        start_mirror, http):
    mirror = await start_mirror(policy=cfg.Policy((cfg.PolicyRule(deny=("*:latest",)),)))
    status, _ = await get(http, f"{mirror.url}/v2/library/busybox/manifests/latest", **ACCEPT)
    assert status == 403
    denials = (await status_json(http, mirror))["denials"]
    assert [(d["kind"], d["client"], d["subject"], d["reason"]) for d in denials] == [
        ("policy", "127.0.0.1", "docker.io/library/busybox:latest",
         'policy.rules[0] deny "*:latest"')]


@pytest.fixture
def htpasswd(tmp_path):
    return write_htpasswd(tmp_path / "htpasswd", alice=cheap_bcrypt(b"wonder-land"))


async def test_status_needs_a_login_when_anonymous_pull_is_off(start_mirror, http, htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd, anonymous_pull=False))
    for path in ("/", "/status.json"):
        async with http.get(f"{mirror.url}{path}") as resp:
            assert resp.status == 401
            assert "WWW-Authenticate" in resp.headers
            assert json.loads(await resp.read())["errors"][0]["code"] == "UNAUTHORIZED"
    document = await status_json(http, mirror, **basic("alice", "wonder-land"))
    assert document["cache"]["hits"] == 0
    # A wrong password is refused and listed by user name; the password is nowhere.
    status, _ = await get(http, f"{mirror.url}/v2/alpine/manifests/3.19",
                          **basic("alice", "guess-0815"))
    assert status == 401
    status, _ = await get(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    assert status == 401  # a bare request is the token flow's first step: not listed
    # An anonymous client asking for a token where anonymous_pull is off: refused, listed.
    status, _ = await get(http, f"{mirror.url}/auth/token?scope=repository:alpine:pull")
    assert status == 401
    async with http.get(f"{mirror.url}/status.json",
                        headers=basic("alice", "wonder-land")) as resp:
        raw = await resp.read()
    denials = json.loads(raw)["denials"]
    assert [(d["kind"], d["user"], d["subject"], d["reason"]) for d in denials] == [
        ("auth", "anonymous", "GET /auth/token", "log in to pull from this registry"),
        ("auth", "alice", "GET /v2/alpine/manifests/3.19", "wrong user name or password")]
    for secret in (b"guess-0815", b"wonder-land", b"$2b$"):
        assert secret not in raw


async def test_status_is_open_read_only_when_anonymous_pull_is_on(start_mirror, http,
                                                                  htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd, anonymous_pull=True))
    document = await status_json(http, mirror)
    assert [u["name"] for u in document["upstreams"]] == ["docker.io", "quay.io"]
    async with http.post(f"{mirror.url}/status.json") as resp:
        assert resp.status in (401, 405)  # nothing is written through the status paths
