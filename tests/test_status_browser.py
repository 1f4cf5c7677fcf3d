"""The status page as a browser shows it: Debian's headless Chromium (tests/support/chromium.py)
renders `/` after real traffic through the mirror (the test upstream: Distribution behind
the fault proxy), and the DOM it built is read back: the charts' drawn series, the
denials panel, and the login the page asks for."""

from __future__ import annotations

import asyncio
import base64
import time
from html.parser import HTMLParser

import pytest

from mirror import config as cfg
from mirror.keys import TRENDS
from tests.support import chromium
from tests.test_access_logins import cheap_bcrypt, write_htpasswd

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
STEP = 1.0  # the sampler's step in these tests (ops/trends.py's Trends.retime)


class Charts(HTMLParser):
    """Each chart's caption, its SVG texts (the axis maximum, the window) and its drawn
    series (label -> the path's `d`)."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict] = {}
        self._chart: dict | None = None
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure" and "chart" in (attrs.get("class") or ""):
            self._chart = {"caption": "", "texts": [], "series": {}}
        elif self._chart is not None and tag in ("figcaption", "text"):
            self._in = tag
            if tag == "text":
                self._chart["texts"].append("")
        elif self._chart is not None and tag == "path" and attrs.get("class") == "series":
            self._chart["series"][attrs["data-series"]] = attrs.get("d") or ""

    def handle_endtag(self, tag):
        if tag == "figure" and self._chart is not None:
            self.charts[self._chart["caption"]] = self._chart
            self._chart = None
        self._in = None if tag in ("figcaption", "text") else self._in

    def handle_data(self, data):
        if self._chart is not None and self._in == "figcaption":
            self._chart["caption"] += data
        elif self._chart is not None and self._in == "text":
            self._chart["texts"][-1] += data


def charts_of(dom: str) -> dict[str, dict]:
    parser = Charts()
    parser.feed(dom)
    return parser.charts


def coordinates(d: str) -> list[tuple[float, float]]:
    """The points a path's M/L commands visit."""
    points = []
    for command in d.split("M")[1:]:
        for pair in command.replace("L", " L ").split("L"):
            if pair.strip():
                x, y = pair.split()
                points.append((float(x), float(y)))
    return points


async def get(http, url: str, **headers) -> int:
    async with http.get(url, headers=headers) as resp:
        await resp.read()
        return resp.status


async def sampled_after(mirror, moment: float, points: int = 1) -> None:
    """Wait until the sampler has taken `points` points ending after `moment`."""
    trends = mirror.server.app[TRENDS]
    for _ in range(int(20 * STEP / 0.02)):
        if sum(p.at > moment for p in trends.hour.points) >= points:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no trend point after {moment}")


async def pulls(http, mirror, alpine, n: int) -> None:
    layer = min(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    for _ in range(n):
        assert await get(http, f"{mirror.url}/v2/alpine/manifests/3.19", **ACCEPT) == 200
        assert await get(http, f"{mirror.url}/v2/alpine/blobs/{layer}") == 200


async def test_charts_draw_the_traffic_and_change_when_it_changes(
        mirror, http, upstream, tmp_path):
    mirror.server.app[TRENDS].retime(STEP)
    alpine = upstream.images["library/alpine"]
    await pulls(http, mirror, alpine, 1)
    await sampled_after(mirror, time.time(), points=3)  # a few quiet points around it

    first = charts_of(await chromium.dump_dom(f"{mirror.url}/", tmp_path))
    assert set(first) >= {"requests per second", "hit ratio", "bytes per second",
                          "upstream errors per 1 s", "fills in flight"}
    drawn = coordinates(first["requests per second"]["series"]["requests"])
    assert len(set(drawn)) >= 3, drawn
    assert len({y for _, y in drawn}) >= 2, "a flat line: the pull was not drawn"
    xs = [x for x, _ in drawn]
    assert xs == sorted(xs) and 0 <= xs[0] and xs[-1] <= 320
    served = coordinates(first["bytes per second"]["series"]["from upstream"])
    assert len({y for _, y in served}) >= 2, "the layer fetched upstream was not drawn"

    # Ten times the traffic within one step: the axis grows and the newest point rises.
    before = time.time()
    await pulls(http, mirror, alpine, 25)
    await sampled_after(mirror, time.time())
    second = charts_of(await chromium.dump_dom(f"{mirror.url}/", tmp_path))
    axis = [float(c["requests per second"]["texts"][0].split()[1].rstrip("/s").replace(",", ""))
            for c in (first, second)]
    assert first["requests per second"]["texts"][1].startswith("last ")
    assert axis[1] > axis[0], axis
    later = coordinates(second["requests per second"]["series"]["requests"])
    assert later != drawn
    trends = mirror.server.app[TRENDS]
    busiest = max(p.requests for p in trends.hour.points if p.at > before)
    assert busiest > 5 and busiest <= axis[1]
    # The hit ratio of the warm pulls is drawn at the top (100%) of its chart.
    ratio = coordinates(second["hit ratio"]["series"]["hit ratio"])
    assert min(y for _, y in ratio) == pytest.approx(14.0)  # charts.TOP: 100%


async def test_a_denied_pull_appears_in_the_denials_panel(start_mirror, http, tmp_path):
    mirror = await start_mirror(policy=cfg.Policy((
        cfg.PolicyRule(upstream="docker.io", deny=("team/secret-*",)),)))
    assert await get(http, f"{mirror.url}/v2/team/secret-sauce/manifests/1.0", **ACCEPT) == 403
    dom = await chromium.dump_dom(f"{mirror.url}/", tmp_path)
    panel = dom.split('id="denials"', 1)[1].split("</section>", 1)[0]
    assert "<td>policy</td><td>-</td><td>127.0.0.1</td>" \
        "<td><code>docker.io/team/secret-sauce:1.0</code></td>" \
        "<td>policy.rules[0] deny \"team/secret-*\"</td>" in panel


async def test_with_logins_the_page_asks_for_one_and_renders_with_it(
        start_mirror, http, tmp_path):
    htpasswd = write_htpasswd(tmp_path / "htpasswd", alice=cheap_bcrypt(b"wonder land"))
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd, anonymous_pull=False))
    async with http.get(f"{mirror.url}/") as resp:
        assert resp.status == 401
        challenges = resp.headers.getall("WWW-Authenticate")
        assert b"trends" not in await resp.read()
    assert "<h2>Trends" not in await chromium.dump_dom(f"{mirror.url}/", tmp_path)
    token = base64.b64encode(b"alice:wonder land").decode()
    async with http.get(f"{mirror.url}/", headers={"Authorization": f"Basic {token}"}) as resp:
        assert resp.status == 200 and "<h2>Trends, last hour</h2>" in await resp.text()
    # A browser answers only a Basic challenge (registry clients get Bearer on /v2/).
    assert challenges == ['Basic realm="mirror"']
    dom = await chromium.dump_dom(f"{mirror.url}/", tmp_path, login=("alice", "wonder land"))
    assert "<h2>Trends, last hour</h2>" in dom and "docker.io" in dom
