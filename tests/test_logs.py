"""Logs worth reading: a client leaving mid-response is one INFO line, not an ERROR
traceback; an upstream that has no such blob is not a failed fill; every real error is one
line carrying the request id; and every OSError is a typed OCI error (500, or 507 for a full
disk) or, once a response began, a closed connection — never a second response. A TLS
handshake on the plain port is one warning naming the client and the fix, not an access
line; the access line's byte count is the body's; the startup line says how it serves.

The mirror here runs as `mirror serve` runs it (aiohttp's runner without handler
cancellation, with its access logger), not as aiohttp's TestServer does: with
handler_cancellation a client leaving cancels the handler, which hides what production
logs when the handler's next write fails.
"""

import asyncio
import base64
import errno
import hashlib
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from mirror import banner, errors, logs, metrics
from mirror import config as cfg
from mirror.api import tls_probes
from mirror.app import make_app
from mirror.cli import ACCESS_LOG
from mirror.keys import PROXY
from mirror.metrics import METRICS
from tests.conftest import mirror_config
from tests.test_metrics import serve, stop
from tests.test_serve import free_port, wait_for

MiB = 1 << 20


@dataclass
class Served:
    url: str
    app: web.Application

    @property
    def proxy(self):
        return self.app[PROXY]


async def run(app: web.Application, access_log_class=logs.TextAccessLogger,
              **options) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=False,
                           access_log=logging.getLogger("aiohttp.access"),
                           access_log_class=access_log_class, **options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def served(tmp_path, upstream):
    app = make_app(mirror_config(tmp_path / "data", upstream.url))
    runner, url = await run(app)
    yield Served(url, app)
    await runner.cleanup()


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.DEBUG, logger="mirror")
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    return caplog


def loud(caplog, request_id=None):
    """WARNING and worse, or those of one request."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING
            and (request_id is None or getattr(r, "request_id", None) == request_id)]


async def settle(served, digest):
    while digest in served.proxy.fills.active:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the handler notices the closed socket at its next write


async def test_client_leaving_mid_response_is_one_info_line_not_a_traceback(
        served, http, upstream, records, big):
    digest, data = big
    upstream.proxy.throttle(2 * MiB, match=digest)
    async with http.get(f"{served.url}/v2/library/alpine/blobs/{digest}") as resp:
        request_id = resp.headers["X-Request-Id"]
        await resp.content.readexactly(64 * 1024)
        resp.close()  # the client hangs up mid-body
    await settle(served, digest)
    assert loud(records) == []
    assert not any(r.exc_info for r in records.records)
    gone = [r for r in records.records if "went away" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO
    assert gone[0].request_id == request_id
    # aiohttp's access line for it is still written, with nginx's 499 for "client left".
    [access] = [r for r in records.records if r.name == "aiohttp.access"]
    assert access.request_id == request_id and '" 499 ' in access.getMessage()
    # And the fill went on for the next client.
    assert served.proxy.store.path(digest).read_bytes() == data


async def test_missing_blob_is_not_a_failed_fill(served, http, upstream, records):
    for name in ("library/alpine", "nobody/nothing"):  # 404 upstream; 401 for a bogus name
        async with http.get(f"{served.url}/v2/{name}/blobs/sha256:{'0' * 64}") as resp:
            assert resp.status in (403, 404)
    assert metrics.total(served.app[METRICS].fills_failed) == 0
    assert loud(records) == []
    assert not any("fill of" in r.getMessage() and r.levelno > logging.DEBUG
                   for r in records.records)


async def test_upstream_down_is_one_warning_with_the_request_id(served, http, upstream,
                                                                records, big):
    digest, _ = big
    upstream.proxy.down()
    async with http.get(f"{served.url}/v2/library/alpine/blobs/{digest}",
                        headers={"X-Request-Id": "trace-down-1"}) as resp:
        assert resp.status == 503
        assert json.loads(await resp.read())["errors"][0]["code"] == "UNAVAILABLE"
    [line] = loud(records)
    assert line.request_id == "trace-down-1" and "unreachable" in line.getMessage()
    assert not line.exc_info
    assert metrics.total(served.app[METRICS].fills_failed) == 1  # a real failure counts


async def test_upstream_cut_mid_body_is_one_fill_warning_with_the_starters_id(
        served, http, upstream, records, big):
    digest, _ = big
    async with http.get(f"{served.url}/v2/library/alpine/manifests/latest") as resp:
        assert resp.status == 200  # the token first: the cut must hit the body
    upstream.proxy.throttle(8 * MiB, match=digest)
    upstream.proxy.cut(at=MiB, match=digest, times=1)
    async with http.get(f"{served.url}/v2/library/alpine/blobs/{digest}",
                        headers={"X-Request-Id": "trace-cut-1"}) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await settle(served, digest)
    fill_lines = [r for r in loud(records) if "fill of" in r.getMessage()]
    assert len(fill_lines) == 1 and fill_lines[0].request_id == "trace-cut-1"
    assert all(r.request_id == "trace-cut-1" for r in loud(records))


def middleware_app(handler) -> web.Application:
    """The mirror's own error middleware and request ids around one handler of a test's."""
    app = web.Application(middlewares=[errors.middleware])
    logs.install(app)
    app.router.add_get("/x", handler)
    return app


@pytest.mark.parametrize("code,status,words", [
    (errno.EIO, 500, "storage error on /srv/mirror/blobs/sha256/ab/abcd: Input/output error"),
    (errno.ENOSPC, 507, "is full: cannot write /srv/mirror/blobs/sha256/ab/abcd"),
], ids=["eio", "enospc"])
async def test_file_error_before_the_response_is_oci_json_and_one_line_naming_the_file(
        http, records, code, status, words):
    async def handler(request):
        raise OSError(code, os.strerror(code), "/srv/mirror/blobs/sha256/ab/abcd")
    runner, url = await run(middleware_app(handler))
    try:
        async with http.get(f"{url}/x") as resp:
            assert resp.status == status
            assert resp.headers["Content-Type"] == "application/json"
            error = json.loads(await resp.read())["errors"][0]
            request_id = resp.headers["X-Request-Id"]
    finally:
        await runner.cleanup()
    assert error["code"] == "UNKNOWN" and words in error["message"]
    [line] = loud(records)
    assert line.levelno == logging.ERROR and words in line.getMessage()
    assert line.request_id == request_id and not line.exc_info


async def test_file_error_after_the_headers_closes_the_connection_not_a_second_response(
        http, records):
    async def handler(request):
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"a" * 100)
        raise OSError(errno.EIO, "Input/output error", "/srv/mirror/blobs/sha256/cd/cdef")
    runner, url = await run(middleware_app(handler))
    try:
        async with http.get(f"{url}/x") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # 100 of the 1000 bytes promised, then the end
    finally:
        await runner.cleanup()
    [line] = loud(records)
    assert "/srv/mirror/blobs/sha256/cd/cdef" in line.getMessage()
    assert "closing the connection" in line.getMessage() and not line.exc_info
    assert not any(r.name == "aiohttp.server" for r in records.records
                   if r.levelno >= logging.ERROR)


def test_text_log_lines_carry_the_request_id(tmp_path):
    port, closed = free_port(), free_port()  # nothing listens on `closed`: upstream down
    proc = serve(tmp_path, f'[server]\nlisten = "127.0.0.1:{port}"\n'
                 f'[storage]\nroot = "{tmp_path}/d"\n[[upstreams]]\nname = "docker.io"\n'
                 f'url = "http://127.0.0.1:{closed}"\ndefault = true\n')
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v2/library/alpine/manifests/1",
            headers={"X-Request-Id": "trace-77"})
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=10)
        assert failed.value.code == 503
    finally:
        out = stop(proc)
    lines = [line for line in out.splitlines() if "[trace-77]" in line]
    assert any(" WARNING [trace-77] GET /v2/library/alpine/manifests/1: " in line
               for line in lines), out
    assert any('"GET /v2/library/alpine/manifests/1 HTTP/1.1" 503' in line for line in lines), out
    assert not out.lstrip().startswith("{")


async def poll(condition, limit: float = 10.0):
    deadline = time.monotonic() + limit
    while not (found := condition()):
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)
    return found


def access_lines(caplog):
    return [r for r in caplog.records if r.name == "aiohttp.access"]


async def tls_handshake(url: str, source: str) -> None:
    """What a client configured with https:// does to a plain-HTTP port: a ClientHello."""
    host, port = url.removeprefix("http://").split(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(ssl.SSLError):  # aiohttp's answer is plain text, not a ServerHello
        await asyncio.wait_for(asyncio.open_connection(
            host, int(port), ssl=context, server_hostname="localhost",
            local_addr=(source, 0)), 10)


async def test_tls_handshake_on_the_plain_port_is_one_warning_naming_the_client_and_fix(
        tmp_path, http, records):
    app = make_app(mirror_config(tmp_path / "data", "http://127.0.0.1:9", upstreams=()))
    runner, url = await run(app, access_log_format=ACCESS_LOG)
    try:
        # Each probe from its own loopback address: the warning is once per client.
        await tls_handshake(url, "127.0.0.37")
        [warning] = await poll(lambda: [r for r in loud(records) if "TLS" in r.getMessage()])
        await tls_handshake(url, "127.0.0.37")  # skopeo probes before every pull: no flood
        await tls_handshake(url, "127.0.0.38")
        await poll(lambda: len(loud(records)) == 2)
        async with http.get(f"{url}/v2/") as resp:  # its line comes after the probes'
            assert resp.status == 200
        await poll(lambda: any('"GET /v2/ HTTP/1.1" 200' in r.getMessage()
                               for r in access_lines(records)))
    finally:
        await runner.cleanup()
    port = url.rpartition(":")[2]
    assert warning.getMessage() == (
        f"127.0.0.37 sent a TLS handshake to this plain-HTTP port {port}: the client is set "
        "up for https:// but this mirror serves http://. Use http:// (or --tls-verify=false, "
        "which makes skopeo and podman fall back to http after this) in the client, or serve "
        "HTTPS: set server.tls_certificate and server.tls_key (`mirror tls init` makes them). "
        "Told once per client per 10 minutes.")
    assert warning.levelno == logging.WARNING and not warning.exc_info
    assert [r.getMessage().split()[0] for r in loud(records)] == ["127.0.0.37", "127.0.0.38"]
    # No "UNKNOWN / HTTP/1.0" 400 access line, and no second line about the same probe.
    assert [r.getMessage() for r in access_lines(records)] == [
        r.getMessage() for r in access_lines(records) if "GET /v2/" in r.getMessage()]
    assert not any("refused a request" in r.getMessage() for r in records.records)


def test_tls_probe_warnings_are_rate_limited_per_client_and_overall():
    now = [0.0]
    probes = tls_probes.TlsProbes(window=600, addresses=2, burst=3, clock=lambda: now[0])
    assert probes.tell("10.0.0.1") == 0
    assert probes.tell("10.0.0.1") is None and probes.tell("10.0.0.1") is None
    now[0] = 601.0
    assert probes.tell("10.0.0.1") == 2  # the next warning counts the quiet ones
    assert probes.tell("10.0.0.2") == 0 and probes.tell("10.0.0.3") == 0
    assert probes.tell("10.0.0.4") is None  # 3 warnings in this window: the burst is spent
    assert len(probes._told) == 2  # at most `addresses` remembered


async def test_access_line_counts_the_body_bytes_sent(served, http, upstream, records, big):
    digest, data = big
    blob = f"{served.url}/v2/library/alpine/blobs/{digest}"
    async with http.get(blob) as resp:  # a miss: streamed from the fill's spool
        assert await resp.read() == data
    await settle(served, digest)
    async with http.get(blob) as resp:  # a hit: the committed file, by sendfile
        assert await resp.read() == data
    async with http.get(blob, headers={"Range": "bytes=100-"}) as resp:
        assert resp.status == 206 and await resp.read() == data[100:]
    async with http.head(blob) as resp:
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(data)
    async with http.get(f"{served.url}/v2/library/alpine/manifests/3.19") as resp:
        manifest = await resp.read()
    await poll(lambda: len(access_lines(records)) == 5)
    lines = access_lines(records)
    assert [r.response_size for r in lines] == [len(data), len(data), len(data) - 100, 0,
                                                len(manifest)]
    assert f'"GET /v2/library/alpine/blobs/{digest} HTTP/1.1" 200 {len(data)} ' \
        in lines[1].getMessage()


async def test_json_access_line_counts_the_body_bytes_sent(tmp_path, http, upstream,
                                                           records, big):
    digest, data = big
    app = make_app(mirror_config(tmp_path / "data", upstream.url))
    runner, url = await run(app, logs.JsonAccessLogger)
    try:
        for _ in range(2):  # a miss, then a hit
            async with http.get(f"{url}/v2/library/alpine/blobs/{digest}") as resp:
                assert await resp.read() == data
            while digest in app[PROXY].fills.active:
                await asyncio.sleep(0.01)
        await poll(lambda: len(access_lines(records)) == 2)
    finally:
        await runner.cleanup()
    assert [r.bytes for r in access_lines(records)] == [len(data), len(data)]


def sha1_htpasswd(path, user: str, password: str) -> str:
    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    path.write_text(f"{user}:{{SHA}}{digest}\n")
    return str(path)


async def test_startup_line_with_no_upstreams_says_hosted_only(tmp_path, records):
    app = make_app(mirror_config(tmp_path / "data", "http://127.0.0.1:9", upstreams=()))
    runner, _ = await run(app)
    await runner.cleanup()
    [line] = [r.getMessage() for r in records.records if r.getMessage().startswith("serving")]
    assert line == (f"serving http://127.0.0.1:0 with data in {(tmp_path / 'data').resolve()}; "
                    "no upstreams (hosted repositories only); pull: no login, push: no "
                    "login, from this host only")


def test_startup_line_says_https_offline_and_logins(tmp_path):
    htpasswd = sha1_htpasswd(tmp_path / "htpasswd", "alice", "pw")
    config = cfg.Config(
        server=cfg.Server(listen="[::]:5443", tls_certificate="c.pem", tls_key="k.pem",
                          offline=True),
        access=cfg.Access(htpasswd=htpasswd, anonymous_pull=False, push_users=("alice",)),
        upstreams=(cfg.Upstream("docker.io", "https://registry-1.docker.io", default=True),))
    assert banner.startup(config, "/srv/mirror") == (
        "serving https://[::]:5443 with data in /srv/mirror; upstreams: "
        "docker.io=https://registry-1.docker.io (default); offline: no upstream is contacted "
        f"(server.offline); logins from {htpasswd}: pull: login required, push: login "
        "required, as alice")
    anonymous = cfg.Config(access=cfg.Access(anonymous_push=True))
    assert banner.startup(anonymous, "d").endswith(
        "quay.io=https://quay.io, ghcr.io=https://ghcr.io, registry.k8s.io=https://"
        "registry.k8s.io, gcr.io=https://gcr.io; pull: no login, push: no login, from "
        "anywhere (access.anonymous_push)")
    assert banner.startup(anonymous, "d").startswith("serving http://0.0.0.0:5000 with data in d")
