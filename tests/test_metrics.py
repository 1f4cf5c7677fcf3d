"""Metrics move with traffic; /healthz and /readyz; request ids and JSON log lines."""

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from mirror import metrics
from tests.conftest import fetched
from tests.test_serve import free_port, wait_for

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")


async def scrape(http, mirror) -> dict[str, float]:
    """GET /metrics, parsed: {'name{label="v",...}': value}."""
    async with http.get(f"{mirror.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await resp.text()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \w+ ", line), line
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def delta(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


async def read(http, url, **headers):
    async with http.get(url, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


async def committed(mirror, digest):
    while digest in mirror.proxy.fills.active:
        await asyncio.sleep(0.01)


@pytest.fixture
def layer(upstream):
    """The ociimage's 64 KiB layer: name, digest and bytes."""
    image = upstream.images["library/ociimage"]
    digest = max(image.layer_digests, key=lambda d: len(image.blobs[d]))
    return "library/ociimage", digest, image.blobs[digest]


async def test_cold_blob_counts_a_miss_and_its_size_fetched_warm_counts_a_hit(
        mirror, http, layer):
    name, digest, data = layer
    url = f"{mirror.url}/v2/{name}/blobs/{digest}"
    before = await scrape(http, mirror)
    status, _, body = await read(http, url)
    assert (status, body) == (200, data)
    await committed(mirror, digest)
    cold = await scrape(http, mirror)
    assert delta(before, cold, 'mirror_cache_misses_total{kind="blob"}') == 1
    assert delta(before, cold, 'mirror_cache_hits_total{kind="blob"}') == 0
    assert delta(before, cold, 'mirror_upstream_bytes_total{upstream="docker.io"}') == len(data)
    assert delta(before, cold, 'mirror_upstream_requests_total{upstream="docker.io"}') == 1
    assert delta(before, cold, 'mirror_fill_duration_seconds_count') == 1
    assert delta(before, cold, 'mirror_http_requests_total{route="blob",status="200"}') == 1

    assert (await read(http, url))[2] == data
    status, _, part = await read(http, url, Range="bytes=100-1099")
    assert (status, part) == (206, data[100:1100])
    warm = await scrape(http, mirror)
    assert delta(cold, warm, 'mirror_cache_hits_total{kind="blob"}') == 2
    assert delta(cold, warm, 'mirror_cache_misses_total{kind="blob"}') == 0
    assert delta(cold, warm, 'mirror_cache_bytes_total{kind="blob"}') == len(data) + 1000
    assert delta(cold, warm, 'mirror_upstream_bytes_total{upstream="docker.io"}') == 0
    assert delta(cold, warm, 'mirror_http_requests_total{route="blob",status="206"}') == 1


async def test_clients_joining_a_running_fill_count_as_coalesced(mirror, http, upstream, layer):
    name, digest, data = layer
    url = f"{mirror.url}/v2/{name}/blobs/{digest}"
    # Meet the token challenge before the stall is set. The manifest first, as a client
    # pulls: a blob HEAD for a repository with nothing cached is answered locally (a push).
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1.0") as resp:
        assert resp.status == 200
    async with http.head(url) as resp:
        assert resp.status == 200
    upstream.proxy.stall(after=1000, match=digest, method="GET")
    before = await scrape(http, mirror)
    first = asyncio.ensure_future(read(http, url))
    while digest not in mirror.proxy.fills.active:
        await asyncio.sleep(0.01)
    others = [asyncio.ensure_future(read(http, url)) for _ in range(3)]
    while mirror.proxy.fills.active[digest].readers < 4:
        await asyncio.sleep(0.01)
    upstream.proxy.release()
    for result in await asyncio.gather(first, *others):
        assert result[2] == data
    after = await scrape(http, mirror)
    assert delta(before, after, 'mirror_cache_misses_total{kind="blob"}') == 4
    assert delta(before, after, 'mirror_coalesced_requests_total{kind="blob"}') == 3
    assert delta(before, after, 'mirror_upstream_bytes_total{upstream="docker.io"}') == len(data)
    assert fetched(upstream, "GET", digest) == 1


async def test_manifest_miss_hit_and_coalesced(mirror, http, upstream):
    app = upstream.images["team/app"]
    url = f"{mirror.url}/v2/quay.io/team/app/manifests/2.0"
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    upstream.proxy.delay(0.3, match="/manifests/2.0", method="GET")
    before = metrics.CACHE_MISSES.value("manifest"), metrics.COALESCED.value("manifest"), \
        metrics.CACHE_HITS.value("manifest"), metrics.CACHE_BYTES.value("manifest")
    results = await asyncio.gather(*(read(http, url, **accept) for _ in range(3)))
    assert all(body == app.manifest for _, _, body in results)
    assert fetched(upstream, "GET", "/manifests/2.0") == 1
    assert metrics.CACHE_MISSES.value("manifest") - before[0] == 3
    assert metrics.COALESCED.value("manifest") - before[1] == 2
    assert metrics.CACHE_HITS.value("manifest") - before[2] == 0

    assert (await read(http, url, **accept))[2] == app.manifest
    assert metrics.CACHE_HITS.value("manifest") - before[2] == 1
    assert metrics.CACHE_BYTES.value("manifest") - before[3] == len(app.manifest)
    assert metrics.REPOSITORIES.counts["quay.io/team/app"] >= 4


async def test_upstream_429_and_503_are_counted_for_that_upstream(mirror, http, upstream):
    before = await scrape(http, mirror)
    upstream.proxy.status(429, {"Retry-After": "1"}, match="/manifests/", times=1)
    status, _, _ = await read(http, f"{mirror.url}/v2/quay.io/team/app/manifests/2.0")
    assert status == 429
    upstream.proxy.status(503, match="/manifests/", times=1)
    status, _, _ = await read(http, f"{mirror.url}/v2/library/alpine/manifests/3.19")
    assert status == 503
    after = await scrape(http, mirror)
    assert delta(before, after, 'mirror_upstream_rate_limited_total{upstream="quay.io"}') == 1
    assert delta(before, after, 'mirror_upstream_errors_total{upstream="quay.io"}') == 1
    assert delta(before, after, 'mirror_upstream_rate_limited_total{upstream="docker.io"}') == 0
    assert delta(before, after, 'mirror_upstream_errors_total{upstream="docker.io"}') == 1
    assert delta(before, after, 'mirror_http_requests_total{route="manifest",status="429"}') == 1
    assert delta(before, after, 'mirror_http_requests_total{route="manifest",status="503"}') == 1
    assert mirror.proxy.upstreams["quay.io"].last_error == "429 Too Many Requests"


async def test_requests_are_counted_by_route_and_status(mirror, http):
    before = await scrape(http, mirror)
    for path in ("/v2/", "/v2/_catalog", "/v2/no/such/manifests/latest", "/healthz", "/nowhere"):
        async with http.get(mirror.url + path) as resp:
            await resp.read()
    after = await scrape(http, mirror)
    for route, status in (("ping", 200), ("catalog", 200), ("healthz", 200), ("other", 404),
                          ("metrics", 200)):
        assert delta(before, after,
                     f'mirror_http_requests_total{{route="{route}",status="{status}"}}') == 1


async def test_disk_gauges_read_registered_callbacks_else_budget_zero(mirror, http):
    saved = metrics.DISK_USED.function, metrics.DISK_BUDGET.function
    try:
        metrics.DISK_USED.function = None
        metrics.DISK_BUDGET.function = lambda: 0
        samples = await scrape(http, mirror)
        assert samples["mirror_disk_budget_bytes"] == 0
        assert "mirror_disk_used_bytes" not in samples
        metrics.set_disk(lambda: 12345, lambda: 10 << 30)
        samples = await scrape(http, mirror)
        assert samples["mirror_disk_used_bytes"] == 12345
        assert samples["mirror_disk_budget_bytes"] == 10 << 30
    finally:
        metrics.DISK_USED.function, metrics.DISK_BUDGET.function = saved
    metrics.EVICTIONS.inc(3)
    metrics.EVICTED_BYTES.inc(3 << 20)
    samples = await scrape(http, mirror)
    assert samples["mirror_evictions_total"] >= 3
    assert samples["mirror_evicted_bytes_total"] >= 3 << 20


def test_exposition_format_of_a_histogram_and_escaped_labels():
    histogram = metrics.Histogram("t_seconds", "A test.", (0.5, 1))
    counter = metrics.Counter("t_total", "Line\nbreak.", ("name",))
    try:
        for value in (0.1, 0.5, 0.7, 3):
            histogram.observe(value)
        counter.inc(2, 'a"b\\c')
        text = metrics.render()
    finally:
        metrics.REGISTRY.remove(histogram)
        metrics.REGISTRY.remove(counter)
    assert 't_seconds_bucket{le="0.5"} 2\nt_seconds_bucket{le="1"} 3\n' \
           't_seconds_bucket{le="+Inf"} 4\nt_seconds_sum 4.3\nt_seconds_count 4\n' in text
    assert "# HELP t_total Line\\nbreak.\n# TYPE t_total counter\n" in text
    assert 't_total{name="a\\"b\\\\c"} 2\n' in text


# Health.
async def test_healthz_and_readyz_answer_ok(mirror, http):
    for path in ("/healthz", "/readyz"):
        async with http.get(mirror.url + path) as resp:
            assert resp.status == 200
            assert await resp.json() == {"status": "ok"}


async def test_readyz_fails_naming_storage_when_tmp_is_not_a_directory(mirror, http):
    tmp = mirror.root / "tmp"
    tmp.rmdir()
    tmp.write_text("not a directory")  # root ignores permissions; this stops root too
    async with http.get(f"{mirror.url}/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["status"] == "unready" and list(body["failed"]) == ["storage"]
    assert "NotADirectoryError" in body["failed"]["storage"]
    tmp.unlink()
    tmp.mkdir()
    async with http.get(f"{mirror.url}/readyz") as resp:
        assert resp.status == 200


# Request ids and log lines.
async def test_every_response_carries_a_request_id_the_clients_when_sane(mirror, http):
    async with http.get(f"{mirror.url}/v2/") as resp:
        first = resp.headers["X-Request-Id"]
    async with http.get(f"{mirror.url}/v2/no/such/blobs/sha256:{'0' * 64}") as resp:
        second = resp.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{16}", first) and first != second
    async with http.get(f"{mirror.url}/v2/", headers={"X-Request-Id": "lb-4711.abc"}) as resp:
        assert resp.headers["X-Request-Id"] == "lb-4711.abc"
    for insane in ('has "quotes" and spaces', "x" * 300):
        async with http.get(f"{mirror.url}/v2/", headers={"X-Request-Id": insane}) as resp:
            assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["X-Request-Id"])


def serve(tmp_path, config_text: str) -> subprocess.Popen:
    """`mirror serve` in a process of its own, logging to its stdout."""
    (tmp_path / "mirror.toml").write_text(config_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    return subprocess.Popen([sys.executable, "-m", "mirror", "serve", "--config",
                             str(tmp_path / "mirror.toml")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    return proc.communicate(timeout=10)[0]


def test_json_log_lines_carry_the_request_id(tmp_path):
    port = free_port()
    closed = free_port()  # nothing listens there: the upstream is down
    proc = serve(tmp_path, f'[server]\nlisten = "127.0.0.1:{port}"\nlog_format = "json"\n'
                 f'[storage]\nroot = "{tmp_path}/d"\n[[upstreams]]\nname = "docker.io"\n'
                 f'url = "http://127.0.0.1:{closed}"\ndefault = true\n')
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/library/alpine/manifests/1",
            headers={"X-Request-Id": "trace-42", "User-Agent": "t/1"})
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=10)
        assert failed.value.code == 503 and failed.value.headers["X-Request-Id"] == "trace-42"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5) as resp:
            generated = resp.headers["X-Request-Id"]
    finally:
        out = stop(proc)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]  # every line
    assert all({"time", "level", "message"} <= line.keys() for line in lines)
    access = [line for line in lines if line["logger"] == "aiohttp.access"]
    failure = next(a for a in access if a.get("request_id") == "trace-42")
    assert failure["method"] == "GET" and failure["status"] == 503
    assert failure["path"] == "/v2/library/alpine/manifests/1"
    assert failure["user_agent"] == "t/1" and failure["bytes"] > 0
    assert isinstance(failure["duration"], float)
    # The warning logged while that request was handled carries its id too.
    assert any(line["level"] == "warning" and line.get("request_id") == "trace-42"
               and line["logger"] != "aiohttp.access" for line in lines), out
    assert any(a["request_id"] == generated and a["path"] == "/v2/" for a in access)
    assert any("serving 127.0.0.1" in line["message"] for line in lines)


def test_text_logs_stay_text(tmp_path):
    port = free_port()
    proc = serve(tmp_path, f'[server]\nlisten = "127.0.0.1:{port}"\n'
                 f'[storage]\nroot = "{tmp_path}/d"\n')
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5) as resp:
            assert re.fullmatch(r"[0-9a-f]{16}", resp.headers["X-Request-Id"])
    finally:
        out = stop(proc)
    assert '"GET /healthz HTTP/1.1" 200' in out and not out.lstrip().startswith("{")
