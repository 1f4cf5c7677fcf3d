"""The scanner gate (`policy.scan_webhook`, trust/scanner.py): every manifest digest is judged
by a webhook before it is first served, its verdict kept by digest.

The webhook is a real aiohttp server on 127.0.0.1 (pytest-aiohttp's `aiohttp_server`) that
answers in the documented format and can allow, deny, hold its answer, fail with a 500,
answer garbage or not listen at all. The upstream is the real test registry behind the
counting proxy, so "no layer was fetched" is counted where the bytes would come from, and a
real skopeo pull shows what a denied client prints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from mirror import config as cfg
from mirror import metrics
from mirror.keys import SCANNER
from mirror.trust.scanner import REASON_LIMIT, clean_reason
from tests.conftest import fetched, sha256, skopeo_copy
from tests.support.images import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.support.registry import free_port

ACCEPT_ALL = {"Accept": ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])}


def load(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "mirror.toml"
    path.write_text(text)
    return cfg.load(str(path), environ={})


async def error_of(response) -> dict:
    return json.loads(await response.read())["errors"][0]


async def poll(condition, what: str, timeout: float = 10.0) -> None:
    """Wait until condition() holds (checked every 10 ms), or fail naming `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@dataclass
class Webhook:
    """A scanner webhook: `answer` is "allow", "deny", "error" (500) or "garbage"; while
    `hold` is clear, answers wait for it."""

    url: str = ""
    answer: str = "allow"
    reason: str = "no known vulnerabilities"
    received: list[dict] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        self.received.append(await request.json())
        await self.hold.wait()
        if self.answer == "error":
            return web.Response(status=500, text="scanner database is updating")
        if self.answer == "garbage":
            return web.Response(text="<html>login required</html>", content_type="text/html")
        return web.json_response({"allow": self.answer == "allow", "reason": self.reason})


@pytest.fixture
async def webhook(aiohttp_server) -> Webhook:
    hook = Webhook()
    hook.hold.set()
    app = web.Application()
    app.router.add_post("/scan", hook.handle)
    server = await aiohttp_server(app)
    hook.url = f"http://127.0.0.1:{server.port}/scan"
    return hook


def gate(url: str, **keys) -> cfg.Policy:
    return cfg.Policy(scan_webhook=url, **keys)


def mirror_metric(mirror, verdict: str) -> float:
    return metrics.value(mirror.server.app[metrics.METRICS].scan_verdicts, verdict=verdict)


# -- config -----------------------------------------------------------------------------

def test_the_documented_form_loads_as_written(tmp_path):
    config = load(tmp_path, """
[policy]
scan_webhook = "http://scanner.internal:8080/scan"   # unset: no scanner gate
scan_timeout = "30s"       # how long a client's request waits for a verdict
scan_fail_closed = true    # webhook unreachable / 5xx / bad answer: deny (true) or allow
scan_repositories = ["myorg/*"]  # optional: only these (same globs as rules); all if unset
""")
    policy = config.policy
    assert (policy.scan_webhook, policy.scan_timeout, policy.scan_fail_closed,
            policy.scan_repositories) == ("http://scanner.internal:8080/scan", 30.0, True,
                                          ("myorg/*",))
    default = load(tmp_path, "").policy
    assert (default.scan_webhook, default.scan_timeout, default.scan_fail_closed,
            default.scan_repositories) == (None, 30.0, True, ())


def test_the_trust_pages_scanner_example_loads_as_written(tmp_path):
    page = (Path(__file__).parent.parent / "docs" / "trust.md").read_text()
    section = page[page.index("## Scanner gate"):]
    example = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    policy = load(tmp_path, example).policy
    assert (policy.scan_webhook, policy.scan_timeout, policy.scan_fail_closed,
            policy.scan_repositories) == ("http://scanner.internal:8080/scan", 30.0, True,
                                          ("library/*", "myorg/*"))
    assert policy.rules == (cfg.PolicyRule("docker.io", deny=("*:latest",)),)
    # The documented request names exactly the fields the mirror sends.
    request = re.search(r'\{"name": .*?\}', section, re.S).group(0)
    assert re.findall(r'"(\w+)": ', request) == ["name", "digest", "media_type", "upstream",
                                                 "reference"]


@pytest.mark.parametrize("text, message", [
    ('[policy]\nscan_webhok = "http://s/scan"', "unknown config key: policy.scan_webhok"),
    ('[policy]\nscan_webhook = "ftp://s/scan"',
     "policy.scan_webhook must be an http:// or https:// URL, not 'ftp://s/scan'"),
    ('[policy]\nscan_timeout = "soon"',
     'policy.scan_timeout must be a duration like 300, "90s", "5m" or "1h"'),
    ('[policy]\nscan_fail_closed = "maybe"',
     "policy.scan_fail_closed must be true or false, not 'maybe'"),
    ('[policy]\nscan_repositories = ["myorg/*:latest"]',
     "policy.scan_repositories[0]: 'myorg/*:latest': the scanner judges manifests by digest, "
     "so only repository globs apply; write 'myorg/*'"),
    ('[policy]\nscan_repositories = ["MyOrg/*"]',
     "policy.scan_repositories[0]: 'MyOrg/*': repository names are lower case"),
])
def test_bad_scan_keys_are_config_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(cfg.ConfigError) as caught:
        load(tmp_path, text)
    assert str(caught.value).startswith(message), str(caught.value)


def test_reasons_are_bounded_and_lose_control_characters():
    assert clean_reason("CVE-2024-1234\r\nINFO forged log line\x1b[31m\u202e") == \
        "CVE-2024-1234 INFO forged log line [31m"
    long = clean_reason("x" * 5000)
    assert len(long) == REASON_LIMIT and long.endswith("…")
    assert clean_reason(None) == clean_reason("  \n ") == "no reason given"


# -- through the mirror -----------------------------------------------------------------

async def test_an_allowed_manifest_is_posted_once_as_documented_and_served_byte_exact(
        start_mirror, http, upstream, webhook):
    mirror = await start_mirror(policy=gate(webhook.url))
    alpine = upstream.images["library/alpine"]
    async with http.get(f"{mirror.url}/v2/alpine/manifests/3.19", headers=ACCEPT_ALL) as r:
        assert r.status == 200
        assert await r.read() == alpine.manifest
    assert webhook.received == [{"name": "library/alpine", "digest": alpine.digest,
                                 "media_type": DOCKER_MANIFEST, "upstream": "docker.io",
                                 "reference": "3.19"}]
    # The verdict is the digest's: by digest, by HEAD, through another upstream's name.
    for method, path in (("GET", f"/v2/library/alpine/manifests/{alpine.digest}"),
                         ("HEAD", "/v2/alpine/manifests/3.19"),
                         ("GET", "/v2/alpine/manifests/3.19")):
        async with http.request(method, mirror.url + path, headers=ACCEPT_ALL) as r:
            assert r.status == 200, path
            assert r.headers["Docker-Content-Digest"] == alpine.digest
    assert len(webhook.received) == 1
    assert mirror_metric(mirror, "allowed") == 4


async def test_a_denied_image_is_403_with_the_reason_and_its_layers_are_never_fetched(
        start_mirror, http, upstream, webhook):
    webhook.answer = "deny"
    webhook.reason = "CVE-2024-3094 (critical) in xz-utils 5.6.0\n" + "y" * 400
    mirror = await start_mirror(policy=gate(webhook.url))
    app = upstream.images["team/app"]
    for method in ("GET", "HEAD", "GET"):
        async with http.request(method, f"{mirror.url}/v2/team/app/manifests/2.0",
                                headers=ACCEPT_ALL) as r:
            assert r.status == 403
            body = await r.read()
            if method == "GET":
                error = json.loads(body)["errors"][0]
    reason = clean_reason(webhook.reason)
    assert reason.startswith("CVE-2024-3094 (critical) in xz-utils 5.6.0 yyy")
    assert len(reason) == REASON_LIMIT
    assert error == {"code": "DENIED",
                     "message": f"the scanner denied docker.io/team/app@{app.digest}: {reason}",
                     "detail": {"name": "team/app", "digest": app.digest, "reason": reason}}
    assert len(webhook.received) == 1  # a denial stays denied
    assert fetched(upstream, contains="/blobs/") == 0
    assert not mirror.blob_files()
    assert mirror_metric(mirror, "denied") == 3


async def test_skopeo_pull_of_a_denied_image_fails_with_the_reason(
        start_mirror, upstream, webhook, tmp_path):
    webhook.answer, webhook.reason = "deny", "CVE-2024-3094 (critical) in xz-utils 5.6.0"
    mirror = await start_mirror(policy=gate(webhook.url))
    alpine = upstream.images["library/alpine"]
    proc = await asyncio.create_subprocess_exec(
        "skopeo", "copy", "--src-tls-verify=false", "--retry-times=0",
        f"docker://{mirror.host}/library/alpine:3.19", f"dir:{tmp_path / 'out'}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    assert f"denied: the scanner denied docker.io/library/alpine@{alpine.digest}: " \
        "CVE-2024-3094 (critical) in xz-utils 5.6.0" in err.decode(), err.decode()
    assert fetched(upstream, contains="/blobs/") == 0
    assert not mirror.blob_files()

    # Once the scanner allows another image, the same client pulls it byte-exact.
    webhook.answer = "allow"
    ociimage = upstream.images["library/ociimage"]
    got = await skopeo_copy(f"{mirror.host}/library/ociimage:1.0", tmp_path / "ok")
    assert got["manifest"] == ociimage.manifest
    assert got["blobs"] == ociimage.blobs
    assert [r["name"] for r in webhook.received] == ["library/alpine", "library/ociimage"]


async def test_ten_concurrent_pulls_and_a_later_one_cost_one_webhook_call(
        start_mirror, http, upstream, webhook):
    webhook.hold.clear()
    mirror = await start_mirror(policy=gate(webhook.url))
    scanner = mirror.server.app[SCANNER]
    alpine = upstream.images["library/alpine"]

    async def pull() -> tuple[int, bytes]:
        async with http.get(f"{mirror.url}/v2/alpine/manifests/3.19", headers=ACCEPT_ALL) as r:
            return r.status, await r.read()

    pulls = [asyncio.ensure_future(pull()) for _ in range(10)]
    await poll(lambda: scanner.waiting == 10 and webhook.received,
               "ten requests waiting for the scan the webhook holds")
    assert len(webhook.received) == 1 and scanner.running == 1
    webhook.hold.set()
    assert await asyncio.gather(*pulls) == [(200, alpine.manifest)] * 10
    assert await pull() == (200, alpine.manifest)
    assert len(webhook.received) == 1
    assert scanner.running == scanner.waiting == 0


@pytest.mark.parametrize("timeout", [0.0, 0.2])
async def test_a_slow_scan_answers_503_with_retry_after_then_200_once_judged(
        start_mirror, http, upstream, webhook, timeout):
    webhook.hold.clear()
    mirror = await start_mirror(policy=gate(webhook.url, scan_timeout=timeout))
    scanner = mirror.server.app[SCANNER]
    multiarch = upstream.images["library/multiarch"]
    url = f"{mirror.url}/v2/library/multiarch/manifests/latest"
    for _ in range(2):  # the second request joins the scan still running
        async with http.get(url, headers=ACCEPT_ALL) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "10"
            assert await error_of(r) == {
                "code": "UNAVAILABLE",
                "message": "the scanner has not judged docker.io/library/multiarch@"
                           f"{multiarch.digest} yet (it is being scanned); retry in 10 s",
                "detail": {"name": "library/multiarch", "digest": multiarch.digest}}
    await poll(lambda: len(webhook.received) == 1, "the webhook call")
    webhook.hold.set()  # the scan finishes with no client waiting: its verdict is kept
    await poll(lambda: multiarch.digest in scanner.verdicts, "the verdict")
    async with http.get(url, headers=ACCEPT_ALL) as r:
        assert r.status == 200
        assert await r.read() == multiarch.manifest
    assert webhook.received == [{"name": "library/multiarch", "digest": multiarch.digest,
                                 "media_type": OCI_INDEX, "upstream": "docker.io",
                                 "reference": "latest"}]
    assert (mirror_metric(mirror, "pending"), mirror_metric(mirror, "allowed")) == (2, 1)

    # An index's child is judged on its own, by its own digest.
    child = multiarch.children[0]
    async with http.get(f"{mirror.url}/v2/library/multiarch/manifests/{child.digest}",
                        headers=ACCEPT_ALL) as r:
        assert r.status in (200, 503)
    await poll(lambda: child.digest in scanner.verdicts, "the child's verdict")
    assert webhook.received[1] == {"name": "library/multiarch", "digest": child.digest,
                                   "media_type": OCI_MANIFEST, "upstream": "docker.io",
                                   "reference": child.digest}


@pytest.mark.parametrize("failure", ["error", "garbage", "unreachable"])
async def test_a_failing_webhook_is_503_when_fail_closed(
        start_mirror, http, upstream, webhook, failure, caplog):
    caplog.set_level(logging.WARNING, logger="mirror")
    webhook.answer = failure
    url = f"http://127.0.0.1:{free_port()}/scan" if failure == "unreachable" else webhook.url
    mirror = await start_mirror(policy=gate(url, scan_fail_closed=True))
    app = upstream.images["team/app"]
    why = {"error": "webhook answered HTTP 500",
           "garbage": 'webhook answer is not JSON {"allow": true|false, "reason": ...}',
           "unreachable": "webhook unreachable: Cannot connect to host 127.0.0.1"}[failure]
    for attempt in (1, 2):  # a failure is kept for nothing: the retry asks again
        async with http.get(f"{mirror.url}/v2/team/app/manifests/2.0", headers=ACCEPT_ALL) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "10"
            error = await error_of(r)
        assert error["code"] == "UNAVAILABLE"
        assert error["message"].startswith(
            f"the scanner could not judge docker.io/team/app@{app.digest} ({why}")
        assert error["message"].endswith("), and unjudged images are not served "
                                         "(policy.scan_fail_closed); retry in 10 s")
    assert len(webhook.received) == (0 if failure == "unreachable" else 2)
    assert mirror_metric(mirror, "error") == 2
    assert fetched(upstream, contains="/blobs/") == 0
    assert f"scanner webhook failed for docker.io/team/app@{app.digest}: {why}" in caplog.text
    assert "not served (policy.scan_fail_closed)" in caplog.text


async def test_a_failing_webhook_is_served_logged_and_counted_when_fail_open(
        start_mirror, http, upstream, webhook, caplog):
    caplog.set_level(logging.WARNING, logger="mirror")
    webhook.answer = "error"
    mirror = await start_mirror(policy=gate(webhook.url, scan_fail_closed=False))
    app = upstream.images["team/app"]
    async with http.get(f"{mirror.url}/v2/team/app/manifests/2.0", headers=ACCEPT_ALL) as r:
        assert r.status == 200
        assert await r.read() == app.manifest
    assert mirror_metric(mirror, "error") == 1
    assert f"scanner webhook failed for docker.io/team/app@{app.digest}: webhook answered " \
        "HTTP 500; served unscanned (policy.scan_fail_closed = false)" in caplog.text
    # Not kept: once the scanner works, its verdict decides.
    webhook.answer = "deny"
    async with http.get(f"{mirror.url}/v2/team/app/manifests/2.0", headers=ACCEPT_ALL) as r:
        assert r.status == 403
    assert len(webhook.received) == 2


async def test_only_scan_repositories_are_judged(start_mirror, http, upstream, webhook):
    webhook.answer = "deny"
    mirror = await start_mirror(policy=gate(webhook.url, scan_repositories=("team/*",)))
    async with http.get(f"{mirror.url}/v2/alpine/manifests/3.19", headers=ACCEPT_ALL) as r:
        assert r.status == 200
        assert await r.read() == upstream.images["library/alpine"].manifest
    assert webhook.received == []
    async with http.get(f"{mirror.url}/v2/quay/team/app/manifests/2.0",
                        headers=ACCEPT_ALL) as r:
        assert r.status == 403
    assert [(r["upstream"], r["name"]) for r in webhook.received] == [("quay.io", "team/app")]


async def test_status_page_and_metrics_show_the_gate_and_its_denials(
        start_mirror, http, upstream, webhook):
    webhook.answer, webhook.reason = "deny", "<script>alert(1)</script> CVE-2024-0001"
    mirror = await start_mirror(policy=gate(webhook.url))
    async with http.get(f"{mirror.url}/v2/team/app/manifests/2.0", headers=ACCEPT_ALL) as r:
        assert r.status == 403
    async with http.get(f"{mirror.url}/metrics") as r:
        text = (await r.read()).decode()
    for verdict, value in (("allowed", 0), ("denied", 1), ("error", 0), ("pending", 0)):
        assert f'mirror_scan_verdicts_total{{verdict="{verdict}"}} {value}.0' in text
    async with http.get(f"{mirror.url}/") as r:
        page = (await r.read()).decode()
    assert "<b>Scanner gate</b>: 0 scans pending (0 requests waiting); requests 0 allowed, " \
        "1 denied, 0 pending, 0 error; 1 verdicts kept" in page
    app = upstream.images["team/app"]
    assert f"<code>docker.io/team/app@{app.digest}</code></td><td>scanner: " \
        "&lt;script&gt;alert(1)&lt;/script&gt; CVE-2024-0001</td>" in page
    assert "<script>alert" not in page



async def test_skopeo_pull_while_the_scan_runs_fails_with_503_and_succeeds_once_judged(
        start_mirror, upstream, webhook, tmp_path):
    webhook.hold.clear()
    mirror = await start_mirror(policy=gate(webhook.url, scan_timeout=0.1))
    alpine = upstream.images["library/alpine"]
    reference = f"{mirror.host}/library/alpine:3.19"
    proc = await asyncio.create_subprocess_exec(
        "skopeo", "copy", "--src-tls-verify=false", "--retry-times=0",
        f"docker://{reference}", f"dir:{tmp_path / 'out'}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    # containers/image prints the status only, not the body's message.
    assert f"reading manifest 3.19 in {reference.rsplit(':', 1)[0]}: received unexpected " \
        "HTTP status: 503 Service Unavailable" in err.decode(), err.decode()
    assert fetched(upstream, contains="/blobs/") == 0

    # skopeo's --retry-times does not retry an HTTP status: the user (or kubelet's back-off)
    # runs the pull again, which succeeds once the scan that went on has its verdict.
    webhook.hold.set()
    await poll(lambda: alpine.digest in mirror.server.app[SCANNER].verdicts, "the verdict")
    got = await skopeo_copy(reference, tmp_path / "again")
    assert got["manifest"] == alpine.manifest
    assert got["blobs"] == alpine.blobs
    assert len(webhook.received) == 1


async def test_pushed_images_are_judged_as_hosted_and_rules_come_first(
        start_mirror, http, upstream, webhook):
    webhook.answer, webhook.reason = "deny", "unsigned base image"
    mirror = await start_mirror(policy=cfg.Policy(
        rules=(cfg.PolicyRule(upstream="docker.io", deny=("*:latest",)),),
        scan_webhook=webhook.url))
    async with http.get(f"{mirror.url}/v2/alpine/manifests/latest", headers=ACCEPT_ALL) as r:
        assert r.status == 403
        assert (await error_of(r))["message"].startswith('policy.rules[0] deny "*:latest"')
    assert webhook.received == [] and upstream.proxy.records == []

    config_blob = b'{"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}'
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config_blob), "size": len(config_blob)},
        "layers": []}).encode()
    async with http.post(f"{mirror.url}/v2/scantest/app/blobs/uploads/?digest="
                         f"{sha256(config_blob)}", data=config_blob) as r:
        assert r.status == 201, await r.read()
    async with http.put(f"{mirror.url}/v2/scantest/app/manifests/1", data=manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201, await r.read()
    async with http.get(f"{mirror.url}/v2/scantest/app/manifests/1") as r:
        assert r.status == 403
        assert (await error_of(r))["message"] == \
            f"the scanner denied scantest/app@{sha256(manifest)}: unsigned base image"
    assert webhook.received == [{"name": "scantest/app", "digest": sha256(manifest),
                                 "media_type": OCI_MANIFEST, "upstream": "hosted",
                                 "reference": "1"}]
