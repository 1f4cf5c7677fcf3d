"""Metrics move with traffic, per application; /healthz and /readyz; request ids and JSON
log lines.

Each application counts in a registry of its own, so these tests read exact values from a
fresh mirror rather than deltas of process-wide counters.
"""

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror import metrics
from mirror.metrics import METRICS
from tests.conftest import fetched
from tests.test_serve import free_port, wait_for

DOCS = Path(__file__).parent.parent / "docs" / "metrics.md"


def samples_of(text: str) -> dict[str, float]:
    """An exposition, parsed by prometheus_client: {'name{label="v",...}': value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


async def scrape(http, mirror) -> dict[str, float]:
    """GET /metrics, parsed."""
    async with http.get(f"{mirror.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
        return samples_of(await resp.text())


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
    status, _, body = await read(http, url)
    assert (status, body) == (200, data)
    await committed(mirror, digest)
    cold = await scrape(http, mirror)
    assert cold['mirror_cache_misses_total{kind="blob"}'] == 1
    assert cold['mirror_cache_hits_total{kind="blob"}'] == 0
    assert cold['mirror_upstream_bytes_total{upstream="docker.io"}'] == len(data)
    assert cold['mirror_upstream_requests_total{upstream="docker.io"}'] == 1
    assert cold['mirror_upstream_bytes_total{upstream="quay.io"}'] == 0
    assert cold["mirror_fill_duration_seconds_count"] == 1
    assert cold['mirror_http_requests_total{route="blob",status="200"}'] == 1
    assert cold["mirror_fills_in_progress"] == 0

    assert (await read(http, url))[2] == data
    status, _, part = await read(http, url, Range="bytes=100-1099")
    assert (status, part) == (206, data[100:1100])
    warm = await scrape(http, mirror)
    assert warm['mirror_cache_hits_total{kind="blob"}'] == 2
    assert warm['mirror_cache_misses_total{kind="blob"}'] == 1
    assert warm['mirror_cache_bytes_total{kind="blob"}'] == len(data) + 1000
    assert warm['mirror_upstream_bytes_total{upstream="docker.io"}'] == len(data)
    assert warm['mirror_http_requests_total{route="blob",status="206"}'] == 1
    assert warm['mirror_http_requests_total{route="metrics",status="200"}'] == 1


async def test_a_pull_fetches_the_manifest_and_blob_sizes_once_and_serves_them_again(
        mirror, http, upstream):
    image = upstream.images["library/ociimage"]
    accept = {"Accept": image.media_type}
    sizes = sum(len(data) for data in image.blobs.values())

    async def pull():
        status, _, manifest = await read(http, f"{mirror.url}/v2/{image.name}/manifests/1.0",
                                         **accept)
        assert (status, manifest) == (200, image.manifest)
        for digest, data in image.blobs.items():
            assert (await read(http, f"{mirror.url}/v2/{image.name}/blobs/{digest}"))[2] == data
            await committed(mirror, digest)

    await pull()
    cold = await scrape(http, mirror)
    assert cold['mirror_upstream_bytes_total{upstream="docker.io"}'] == \
        len(image.manifest) + sizes
    assert cold['mirror_cache_misses_total{kind="manifest"}'] == 1
    assert cold['mirror_cache_misses_total{kind="blob"}'] == len(image.blobs)
    assert cold['mirror_cache_bytes_total{kind="blob"}'] == 0
    await pull()
    warm = await scrape(http, mirror)
    assert warm['mirror_upstream_bytes_total{upstream="docker.io"}'] == \
        len(image.manifest) + sizes
    assert warm['mirror_upstream_requests_total{upstream="docker.io"}'] == \
        cold['mirror_upstream_requests_total{upstream="docker.io"}']
    assert warm['mirror_cache_hits_total{kind="manifest"}'] == 1
    assert warm['mirror_cache_hits_total{kind="blob"}'] == len(image.blobs)
    assert warm['mirror_cache_bytes_total{kind="manifest"}'] == len(image.manifest)
    assert warm['mirror_cache_bytes_total{kind="blob"}'] == sizes


async def test_two_apps_in_one_process_count_apart(start_mirror, http, layer, tmp_path):
    one = await start_mirror(root=tmp_path / "one")
    other = await start_mirror(root=tmp_path / "other")
    name, digest, data = layer
    assert (await read(http, f"{one.url}/v2/{name}/blobs/{digest}"))[2] == data
    await committed(one, digest)
    counted, untouched = await scrape(http, one), await scrape(http, other)
    assert counted['mirror_cache_misses_total{kind="blob"}'] == 1
    assert counted['mirror_upstream_bytes_total{upstream="docker.io"}'] == len(data)
    assert untouched['mirror_cache_misses_total{kind="blob"}'] == 0
    assert untouched['mirror_upstream_bytes_total{upstream="docker.io"}'] == 0
    assert untouched["mirror_fill_duration_seconds_count"] == 0
    assert 'mirror_http_requests_total{route="blob",status="200"}' not in untouched
    assert one.server.app[METRICS] is not other.server.app[METRICS]


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
    assert (await scrape(http, mirror))["mirror_fills_in_progress"] == 1
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
    counted = mirror.server.app[METRICS]
    upstream.proxy.delay(0.3, match="/manifests/2.0", method="GET")
    results = await asyncio.gather(*(read(http, url, **accept) for _ in range(3)))
    assert all(body == app.manifest for _, _, body in results)
    assert fetched(upstream, "GET", "/manifests/2.0") == 1
    assert metrics.value(counted.cache_misses, kind="manifest") == 3
    assert metrics.value(counted.coalesced, kind="manifest") == 2
    assert metrics.value(counted.cache_hits, kind="manifest") == 0

    assert (await read(http, url, **accept))[2] == app.manifest
    assert metrics.value(counted.cache_hits, kind="manifest") == 1
    assert metrics.value(counted.cache_bytes, kind="manifest") == len(app.manifest)
    assert counted.repositories.counts == {"quay.io/team/app": 4}


async def test_upstream_429_and_503_are_counted_for_that_upstream(mirror, http, upstream):
    upstream.proxy.status(429, {"Retry-After": "1"}, match="/manifests/", times=1)
    status, _, _ = await read(http, f"{mirror.url}/v2/quay.io/team/app/manifests/2.0")
    assert status == 429
    upstream.proxy.status(503, match="/manifests/", times=1)
    status, _, _ = await read(http, f"{mirror.url}/v2/library/alpine/manifests/3.19")
    assert status == 503
    after = await scrape(http, mirror)
    assert after['mirror_upstream_rate_limited_total{upstream="quay.io"}'] == 1
    assert after['mirror_upstream_errors_total{upstream="quay.io"}'] == 1
    assert after['mirror_upstream_rate_limited_total{upstream="docker.io"}'] == 0
    assert after['mirror_upstream_errors_total{upstream="docker.io"}'] == 1
    assert after['mirror_http_requests_total{route="manifest",status="429"}'] == 1
    assert after['mirror_http_requests_total{route="manifest",status="503"}'] == 1
    assert mirror.proxy.upstreams["quay.io"].last_error == "429 Too Many Requests"


async def test_requests_are_counted_by_route_and_status(mirror, http):
    before = await scrape(http, mirror)
    for path in ("/v2/", "/v2/_catalog", "/v2/no/such/manifests/latest", "/healthz", "/nowhere"):
        async with http.get(mirror.url + path) as resp:
            await resp.read()
    after = await scrape(http, mirror)
    assert not any(key.startswith("mirror_http_requests_total") for key in before)
    for route, status in (("ping", 200), ("catalog", 200), ("healthz", 200), ("other", 404),
                          ("metrics", 200)):
        assert after[f'mirror_http_requests_total{{route="{route}",status="{status}"}}'] == 1


def test_disk_gauges_read_registered_callbacks_else_budget_zero(caplog):
    counted = metrics.Metrics()
    samples = samples_of(counted.exposition().decode())
    assert samples["mirror_disk_budget_bytes"] == 0
    assert "mirror_disk_used_bytes" not in samples
    counted.set_disk(lambda: 12345, lambda: 10 << 30)
    samples = samples_of(counted.exposition().decode())
    assert samples["mirror_disk_used_bytes"] == 12345
    assert samples["mirror_disk_budget_bytes"] == 10 << 30
    assert counted.disk.read() == (12345, 10 << 30)

    def broken():
        raise OSError("the ledger is gone")
    counted.set_disk(broken, lambda: 10 << 30)
    with caplog.at_level(logging.ERROR, logger="mirror"):
        samples = samples_of(counted.exposition().decode())  # the scrape still answers
    assert "mirror_disk_used_bytes" not in samples and samples["mirror_disk_budget_bytes"] == 0
    assert samples['mirror_cache_hits_total{kind="blob"}'] == 0
    assert ["the disk metrics' callback failed"] == [r.getMessage() for r in caplog.records]


def test_histogram_buckets_are_cumulative_and_label_values_escaped():
    counted = metrics.Metrics()
    for seconds in (0.1, 0.5, 0.7, 3):
        counted.fill_seconds.observe(seconds)
    counted.requests.labels('a"b\\c\nd', 200).inc(2)
    text = counted.exposition().decode()
    samples = samples_of(text)
    buckets = {le: samples[f'mirror_fill_duration_seconds_bucket{{le="{le}"}}']
               for le in ("0.25", "0.5", "1.0", "2.5", "5.0", "+Inf")}
    assert buckets == {"0.25": 1, "0.5": 2, "1.0": 3, "2.5": 3, "5.0": 4, "+Inf": 4}
    assert samples["mirror_fill_duration_seconds_sum"] == pytest.approx(4.3)
    assert samples["mirror_fill_duration_seconds_count"] == 4
    assert samples['mirror_http_requests_total{route="a"b\\c\nd",status="200"}'] == 2
    assert "_created" not in text  # turned off: they would double the output


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """docs/metrics.md's tables: {metric: (type, labels)}."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            labels = frozenset(re.findall(r"`(\w+)`", cells[2]))
            rows[cells[0].strip("`")] = (cells[1], labels)
    return rows


def test_every_metric_is_documented_with_its_type_and_labels():
    docs = documented()
    counted = metrics.Metrics()
    counted.set_disk(lambda: 1, lambda: 2)
    families = {family.name: family for family in counted.registry.collect()}
    # Give each labelled metric one series, by the labels the docs name: prometheus_client
    # refuses label names the metric was not made with.
    for metric in vars(counted).values():
        if isinstance(metric, (prometheus_client.Counter, prometheus_client.Gauge)):
            name = metric.describe()[0].name
            full = f"{name}_total" if metric.describe()[0].type == "counter" else name
            labels = docs[full][1]
            if labels:
                metric.labels(**{label: "x" for label in labels}).inc()
    seen = {}
    for family in text_string_to_metric_families(counted.exposition().decode()):
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = frozenset(k for s in family.samples for k in s.labels) - {"le"}
        assert family.samples, f"{name} has no sample"
        seen[name] = (family.type, labels)
    assert seen == docs
    assert len(families) == len(docs)


async def test_status_page_and_metrics_read_the_same_counts(mirror, http, layer):
    name, digest, data = layer
    assert (await read(http, f"{mirror.url}/v2/{name}/blobs/{digest}"))[2] == data
    await committed(mirror, digest)
    assert (await read(http, f"{mirror.url}/v2/{name}/blobs/{digest}"))[2] == data
    async with http.get(f"{mirror.url}/") as resp:
        html = await resp.text()
    samples = await scrape(http, mirror)
    assert samples['mirror_cache_hits_total{kind="blob"}'] == 1
    assert "<dt>hit ratio</dt><dd>50.0%</dd>" in html
    assert "<dt>hits / misses</dt><dd>1 / 1</dd>" in html


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
    assert any(f"serving http://127.0.0.1:{port} " in line["message"] for line in lines)


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
