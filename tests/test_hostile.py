"""Hostile traffic on raw sockets: every connection limit answers with OCI error JSON or a
closed connection — never a 500, never a hang — and slow or oversized clients do not stop
anyone else from being served.

The limits are configured small (`limits` in `start_mirror`) so the tests run in seconds;
the defaults are the same mechanisms at aiohttp's sizes (8190 bytes) and 30 s / 75 s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl

import pytest

HEADER_TIMEOUT = 1.0
KEEPALIVE = 2.0
LIMITS = {"header_timeout": HEADER_TIMEOUT, "keepalive_timeout": KEEPALIVE,
          "max_line_size": 1024, "max_field_size": 1024}
# Generous bounds on how long a test waits for the server to act: past them it hangs.
HANG = 15.0


@pytest.fixture
async def hostile(start_mirror):
    return await start_mirror(limits=LIMITS)


async def connect(mirror):
    host, port = mirror.host.split(":")
    return await asyncio.open_connection(host, int(port))


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, headers, body


async def exchange(mirror, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    reader, writer = await connect(mirror)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), HANG)
    finally:
        writer.close()


def oci_error(raw: bytes) -> tuple[int, str, str]:
    """(status, OCI code, message) of a whole error response; fails unless it is one."""
    status, headers, body = parse(raw)
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert headers["docker-distribution-api-version"] == "registry/2.0"
    error = json.loads(body)["errors"][0]
    return status, error["code"], error["message"]


async def ping(http, mirror) -> tuple[int, bytes]:
    async with http.get(f"{mirror.url}/v2/") as resp:
        return resp.status, await resp.read()


async def test_request_line_past_the_limit_is_refused_with_oci_json(hostile, http, caplog):
    raw = await exchange(hostile, b"GET /v2/" + b"a" * 2000 + b"/manifests/latest HTTP/1.1\r\n"
                                  b"Host: m\r\n\r\n")
    status, code, message = oci_error(raw)
    assert (status, code) == (431, "UNSUPPORTED")
    assert "max_line_size" in message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback
    assert await ping(http, hostile) == (200, b"{}")


async def test_header_field_past_the_limit_is_refused_with_oci_json(hostile, http):
    raw = await exchange(hostile, b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Big: " + b"b" * 2000
                                  + b"\r\n\r\n")
    status, code, message = oci_error(raw)
    assert (status, code) == (431, "UNSUPPORTED")
    assert "max_field_size" in message
    assert await ping(http, hostile) == (200, b"{}")


async def test_too_many_headers_are_refused_with_oci_json(hostile):
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(300))
    raw = await exchange(hostile, b"GET /v2/ HTTP/1.1\r\nHost: m\r\n" + headers + b"\r\n")
    status, code, _ = oci_error(raw)
    assert (status, code) == (400, "UNSUPPORTED")


async def test_tls_client_hello_on_the_plain_port_gets_oci_json_not_a_traceback(hostile, http,
                                                                                caplog):
    """skopeo with --src-tls-verify=false tries https first on the plain-http port."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="mirror.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a real TLS handshake record
    status, code, _ = oci_error(await exchange(hostile, hello))
    assert (status, code) == (400, "UNSUPPORTED")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert await ping(http, hostile) == (200, b"{}")


async def slow_client(mirror, interval: float) -> bytes | None:
    """A slowloris connection: a request line, then one header line every `interval`
    seconds, never the blank line that ends the headers. Returns what the server sent
    before closing, or None when it reset the connection (our last write crossed its close)."""
    reader, writer = await connect(mirror)
    reading = asyncio.ensure_future(reader.read())
    try:
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n")
        for n in range(int(HANG / interval)):
            await asyncio.wait({reading}, timeout=interval)
            if reading.done():
                break
            writer.write(b"X-Slow-%d: still coming\r\n" % n)
        return await asyncio.wait_for(reading, HANG)
    except ConnectionError:
        return None
    finally:
        writer.close()


async def test_slowloris_connections_are_closed_and_other_clients_are_served(start_mirror, http):
    # A longer deadline here, so "the pings did not wait for them" holds on a loaded machine.
    # (aiohttp's keep-alive timer runs while a request's headers are awaited too: it must be
    # the longer one, or it closes them first, silently.)
    hostile = await start_mirror(limits={**LIMITS, "header_timeout": 3.0,
                                         "keepalive_timeout": 6.0})
    # Each sends a header line every 0.3 s: a timer reset by every byte would never fire.
    slow = [asyncio.ensure_future(slow_client(hostile, 0.3)) for _ in range(200)]
    await asyncio.sleep(0.1)  # let them connect and start trickling
    # Everyone else is served while 200 connections hold headers open.
    pings = await asyncio.gather(*(ping(http, hostile) for _ in range(10)))
    assert pings == [(200, b"{}")] * 10
    assert not any(task.done() for task in slow)  # the pings did not wait for them
    outcomes = await asyncio.wait_for(asyncio.gather(*slow), HANG)
    answered = [oci_error(raw) for raw in outcomes if raw]
    # Every connection was closed by the server (none ran into HANG); those whose close did
    # not cross a last header line got the 408 with OCI JSON.
    assert len(outcomes) == 200 and all(raw != b"" for raw in outcomes)
    assert answered and all(status == 408 and code == "UNSUPPORTED"
                            for status, code, _ in answered)
    assert "header_timeout" in answered[0][2]
    assert await ping(http, hostile) == (200, b"{}")


async def test_connection_that_never_sends_a_byte_is_closed_silently(hostile):
    reader, writer = await connect(hostile)
    try:
        assert await asyncio.wait_for(reader.read(), HANG) == b""
    finally:
        writer.close()


async def test_idle_keep_alive_connection_is_reused_then_closed(hostile):
    reader, writer = await connect(hostile)
    try:
        for _ in range(2):  # kept alive: a second request on the same connection
            writer.write(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG)
            status, headers, _ = parse(head)
            body = await reader.readexactly(int(headers["content-length"]))
            assert (status, body) == (200, b"{}")
        # Then idle: closed by the server after keepalive_timeout, with nothing sent.
        assert await asyncio.wait_for(reader.read(), HANG) == b""
    finally:
        writer.close()


async def test_header_deadline_does_not_cut_a_slow_request_body(hostile, http):
    """The deadline covers the headers only: an upload body may take its time."""
    async with http.post(f"{hostile.url}/v2/hostile/slowbody/blobs/uploads/") as resp:
        assert resp.status == 202, await resp.text()
        location = resp.headers["Location"]
    body = b"x" * 4000
    reader, writer = await connect(hostile)
    try:
        writer.write(f"PATCH {location} HTTP/1.1\r\nHost: m\r\nContent-Length: {len(body)}\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode())
        for i in range(0, len(body), 1000):  # 4 pieces over 2.4 s: past the header deadline
            await asyncio.sleep(HEADER_TIMEOUT * 0.6)
            writer.write(body[i:i + 1000])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HANG)
        status, headers, _ = parse(head)
        assert status == 202
        assert headers["range"] == f"0-{len(body) - 1}"  # every byte was stored
    finally:
        writer.close()
