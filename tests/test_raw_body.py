"""The cold-fill thread path (upstream/raw_body.py, Fill._pump): which bodies leave aiohttp for
a worker thread (plain HTTP and TLS), that the bytes read there are exactly the upstream's, that a break returns
the good bytes before it and then says why, and that a stopped fill leaves no thread behind.

The servers here are real sockets on loopback: a plain aiohttp server, the same over TLS with
a CA of ops/certs.py, one answering chunked, one gzip-encoded, one closing or stalling
mid-body, as real upstreams and CDNs do."""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time

import aiohttp
import pytest
from aiohttp import web

from mirror.errors import BodyBroken
from mirror.metrics import Metrics
from mirror.ops.certs import make_ca_and_server_cert
from mirror.upstream.raw_body import detach

from .test_blobs import authorized, blob_url, get, read_short

MiB = 1 << 20
BODY = os.urandom(3 * MiB + 12345)


class Origin:
    """Serves BODY at /plain, /chunked, /gzip, /short (closes 1 MiB early), /stall (stops
    after 1 MiB and waits); records each request's peer port."""

    def __init__(self):
        self.peers: list[int] = []
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{kind}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.peers.append(request.transport.get_extra_info("peername")[1])
        kind = request.match_info["kind"]
        if kind == "chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for at in range(0, len(BODY), MiB):
                await response.write(BODY[at:at + MiB])
            await response.write_eof()
            return response
        headers = {"Content-Length": str(len(BODY))}
        if kind == "gzip":
            headers["Content-Encoding"] = "gzip"
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        if kind in ("short", "stall"):
            await response.write(BODY[:MiB])
            if kind == "stall":
                await self.release.wait()
            request.transport.close()
            return response
        await response.write(BODY)
        await response.write_eof()
        return response


@pytest.fixture
async def origin(aiohttp_server):
    fake = Origin()
    server = await aiohttp_server(fake.app())
    yield fake, f"http://127.0.0.1:{server.port}"
    fake.release.set()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def counts():
    return Metrics().upstream("test")


async def read_all(raw) -> bytes:
    """The body as the pump reads it: the head, then read_into on a thread."""

    def pump() -> bytes:
        out, buffer = bytearray(raw.head), memoryview(bytearray(MiB))
        while raw.remaining:
            out += buffer[:raw.read_into(buffer)]
        return bytes(out)

    try:
        return await asyncio.to_thread(pump)
    finally:
        raw.close()


async def test_plain_http_body_is_read_on_a_thread_byte_exact_and_not_reused(origin,
                                                                              session):
    fake, url = origin
    series = counts()
    async with session.get(f"{url}/plain") as response:
        raw = detach(response, series, 5.0)
        assert raw is not None and raw.remaining == len(BODY) - len(raw.head)
        assert await read_all(raw) == BODY
    assert series.bytes._value.get() == len(BODY)
    # aiohttp saw an unfinished payload: the connection is closed, not pooled.
    async with session.get(f"{url}/plain") as response:
        assert await response.read() == BODY
    assert len(set(fake.peers)) == 2


@pytest.mark.parametrize("kind", ["chunked", "gzip"])
async def test_chunked_or_encoded_bodies_stay_with_aiohttp(origin, session, kind):
    _, url = origin
    async with session.get(f"{url}/{kind}") as response:
        assert detach(response, counts(), 5.0) is None
        assert await response.read() == BODY  # nothing was taken from it


@pytest.fixture
async def tls_origin(aiohttp_server, tmp_path):
    """Origin over TLS with a CA of ops/certs.py; (its URL, a client context trusting it)."""
    ca, cert, key = make_ca_and_server_cert(tmp_path, ["127.0.0.1"])
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    fake = Origin()
    server = await aiohttp_server(fake.app(), ssl=served)
    yield f"https://127.0.0.1:{server.port}", ssl.create_default_context(cafile=str(ca))
    fake.release.set()


async def test_tls_bodies_are_read_on_the_thread_in_the_connections_own_session(
        tls_origin, session):
    url, trusted = tls_origin
    series = counts()
    for _ in range(2):  # the first response of a connection, and one after a fresh handshake
        async with session.get(f"{url}/plain", ssl=trusted) as response:
            raw = detach(response, series, 5.0)
            assert raw is not None and raw.tls is not None
            assert await read_all(raw) == BODY
    assert series.bytes._value.get() == 2 * len(BODY)


async def test_a_tls_body_closed_early_returns_its_good_bytes_then_breaks(tls_origin, session):
    url, trusted = tls_origin
    async with session.get(f"{url}/short", ssl=trusted) as response:
        raw = detach(response, counts(), 5.0)
        assert raw is not None and raw.tls is not None
        got = bytearray(raw.head)
        buffer = memoryview(bytearray(4 * MiB))
        with pytest.raises(BodyBroken, match="upstream body broke off"):
            while True:
                got += buffer[:await asyncio.to_thread(raw.read_into, buffer)]
        raw.close()
    assert bytes(got) == BODY[:MiB]


async def test_a_body_closed_early_returns_its_good_bytes_then_says_how_many_are_missing(
        origin, session):
    _, url = origin
    series = counts()
    async with session.get(f"{url}/short") as response:
        raw = detach(response, series, 5.0)
        with pytest.raises(BodyBroken) as broke:
            await read_all(raw)
    assert f"the connection closed with {len(BODY) - MiB} bytes still to come" in str(broke.value)
    assert series.errors._value.get() == 1


async def test_a_stalled_body_breaks_after_the_stall_timeout_keeping_the_bytes_before(
        origin, session):
    _, url = origin
    async with session.get(f"{url}/stall") as response:
        raw = detach(response, counts(), 0.3)
        got = bytearray(raw.head)
        buffer = memoryview(bytearray(4 * MiB))
        began = time.monotonic()
        while len(got) < MiB:  # the first read returns what came before the stall
            got += buffer[:await asyncio.to_thread(raw.read_into, buffer)]
        assert bytes(got) == BODY[:MiB]
        with pytest.raises(BodyBroken, match=r"no byte for 0.3s"):
            await asyncio.to_thread(raw.read_into, buffer)
        assert time.monotonic() - began >= 0.3
        raw.close()


def pump_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fill sha256:")]


async def test_a_cold_fill_runs_on_its_own_thread_and_a_stopped_one_leaves_none(
        start_mirror, http, upstream, big):
    """Through the tests' real Distribution and fault proxy: a throttled fill is read by a
    `fill <digest>` thread; stopping the fills mid-body, as the app's cleanup does, ends
    that thread and removes the spool (no descriptor written after run() closed it)."""
    digest, data = big
    mirror = await start_mirror()
    await authorized(mirror, http, digest)
    upstream.proxy.throttle(MiB, match=digest)
    reading = asyncio.create_task(read_short(http, blob_url(mirror, digest)))
    for _ in range(100):
        if pump_threads() and mirror.proxy.fills.active:
            break
        await asyncio.sleep(0.05)
    [thread] = pump_threads()
    assert thread.name == f"fill {digest[:19]}"
    await mirror.proxy.fills.close()
    thread.join(5)
    assert not thread.is_alive() and pump_threads() == []
    received, promised = await reading
    assert received < promised == len(data)
    assert list((mirror.root / "tmp").iterdir()) == [] and mirror.blob_files() == []


async def test_an_unthrottled_cold_fill_on_the_thread_stores_the_exact_bytes(mirror, http,
                                                                             upstream,
                                                                             big):
    digest, data = big
    await authorized(mirror, http, digest)
    status, _, body = await get(http, blob_url(mirror, digest))
    assert (status, body) == (200, data)
    for _ in range(100):
        if mirror.blob_files():
            break
        await asyncio.sleep(0.05)
    [stored] = mirror.blob_files()
    assert stored.read_bytes() == data
    gets = [r for r in upstream.proxy.records if r.method == "GET" and digest in r.path]
    assert [r.status for r in gets] == [200]


async def test_fills_past_the_pump_limit_read_on_the_loop_with_the_same_bytes(
        mirror, http, upstream, big, monkeypatch):
    """PUMP_LIMIT caps the threads (32 of them starved the loop, bench/mixed.py): a fill
    over it takes aiohttp's path, and the client and the store get the same bytes."""
    from mirror.cache import fill as fill_module

    monkeypatch.setattr(fill_module, "PUMP_LIMIT", 0)
    digest, data = big
    await authorized(mirror, http, digest)
    upstream.proxy.throttle(4 * MiB, match=digest)
    reading = asyncio.create_task(get(http, blob_url(mirror, digest)))
    for _ in range(100):
        if mirror.proxy.fills.active:
            break
        await asyncio.sleep(0.02)
    assert mirror.proxy.fills.active and pump_threads() == []
    status, _, body = await reading
    assert (status, body) == (200, data)
