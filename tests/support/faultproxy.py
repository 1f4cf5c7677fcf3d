"""A recording reverse proxy between the mirror and the registry that injects network faults.

It owns the path from the mirror to its upstream: every request is forwarded as it came
(method, byte-exact path and query, headers less hop-by-hop ones, bodies streamed both
ways, no redirects followed, nothing decompressed), recorded (`requests`, `count()`,
`body_bytes()`), and, when a test has set a matching fault, damaged on purpose: a body
cut short, a flipped byte, a stall, a canned status, a refused connection, a delay, a
throttle. It runs on a `ServerThread`; every method a test calls is plain and thread-safe,
so a test sets faults and reads counters without awaiting anything.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .serverthread import ServerThread

# Never forwarded: hop-by-hop headers describe one connection, not the message (RFC 9110
# 7.6.1), and Host must name the registry, which aiohttp sets from the upstream URL.
NOT_FORWARDED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
              "te", "trailer", "transfer-encoding", "upgrade", "host"}
CHUNK = 64 * 1024


@dataclass
class Fault:
    kind: str                    # cut | corrupt | stall | hold | status | delay | throttle
    match: str = ""              # substring of the request's path+query; "" matches all
    method: str | None = None    # only this method, if set
    times: int | None = None     # apply to the next N matching requests; None: to all
    at: int = 0                  # byte offset, for cut / corrupt / stall
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0         # delay
    rate: int = 0                # throttle, bytes per second

    def matches(self, method: str, path: str) -> bool:
        return (self.match in path and (self.method is None or self.method == method)
                and (self.times is None or self.times > 0))


@dataclass
class Record:
    """One request as the proxy saw it; `sent` grows while the body streams."""
    method: str
    path: str                    # raw path + query, as received
    faults: list[str]            # kinds of the faults applied
    status: int | None = None    # None until the response starts
    sent: int = 0                # body bytes written to the client
    time: float = field(default_factory=time.time)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = 0
        self.url = ""
        self._lock = threading.Lock()  # guards _faults, _records and _released
        self._faults: list[Fault] = []
        self._records: list[Record] = []
        # Stalled responses wait on this event; release() sets it and puts in a fresh one.
        self._released = asyncio.Event()
        self._stalled = 0
        self._thread: ServerThread | None = None
        self._listener: asyncio.AbstractServer | None = None

    # -- life ----------------------------------------------------------------------------

    def start(self, thread: ServerThread) -> "FaultProxy":
        self._thread = thread

        async def start() -> None:
            # A bare web.Server, not an Application: no router that could normalise paths.
            # handler_cancellation: when the client hangs up, the handler (and with it the
            # upstream request) is cancelled, just as a real proxy would drop it.
            self._server = web.Server(self._handle, handler_cancellation=True, access_log=None)
            self._session = aiohttp.ClientSession(
                auto_decompress=False,  # bytes pass through as the registry sent them
                connector=aiohttp.TCPConnector(limit=0),  # never the bottleneck in a test
                cookie_jar=aiohttp.DummyCookieJar(),
                # None of the default headers aiohttp would add of its own accord.
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
            await self._listen()
            self.port = self._listener.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{self.port}"
            thread.on_stop(self._shutdown)

        thread.call(start())
        return self

    async def _listen(self) -> None:
        self._listener = await asyncio.get_running_loop().create_server(
            self._server, "127.0.0.1", self.port, reuse_address=True)

    async def _shutdown(self) -> None:
        self.release()
        if self._listener is not None:
            self._listener.close()
        await self._server.shutdown(1)
        await self._session.close()

    def down(self) -> None:
        """Refuse service: stop listening (new connections are refused) and drop open ones."""

        async def down() -> None:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            # Kept-alive connections would otherwise keep working: reset them, too.
            for handler in self._server.connections:
                if handler.transport is not None:
                    handler.transport.abort()

        self._call(down())

    def up(self) -> None:
        """Listen again, on the same port, so the mirror's configured URL works again."""

        async def up() -> None:
            if self._listener is None:
                await self._listen()

        self._call(up())

    def _call(self, coro: Any) -> Any:
        assert self._thread is not None, "FaultProxy not started"
        return self._thread.call(coro)

    # -- faults (called from the test thread) --------------------------------------------

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def cut(self, at: int, match: str = "", method: str | None = None,
            times: int | None = None) -> Fault:
        """Send the headers (with the full Content-Length), `at` body bytes, then reset the
        connection. A body no longer than `at` passes whole."""
        return self.add(Fault("cut", match, method, times, at=at))

    def corrupt(self, offset: int, match: str = "", method: str | None = None,
                times: int | None = None) -> Fault:
        """Flip every bit of the body byte at `offset`; the length stays the same."""
        return self.add(Fault("corrupt", match, method, times, at=offset))

    def stall(self, after: int = 0, match: str = "", method: str | None = None,
              times: int | None = None) -> Fault:
        """Send `after` body bytes, then hold the connection open until release() (or the
        client hangs up, or the proxy stops). `proxy.stalled` counts the held responses."""
        return self.add(Fault("stall", match, method, times, at=after))

    def hold(self, match: str = "", method: str | None = None,
             times: int | None = None) -> Fault:
        """Answer nothing, not even headers, until release() (or the client hangs up): an
        upstream slow to answer. Counted in `proxy.stalled` like a stall."""
        return self.add(Fault("hold", match, method, times))

    def status(self, code: int, headers: dict[str, str] | None = None, body: bytes = b"",
               match: str = "", method: str | None = None, times: int | None = None) -> Fault:
        """Answer `code` at once, without contacting the registry."""
        return self.add(Fault("status", match, method, times, status=code,
                              headers=dict(headers or {}), body=body))

    def delay(self, seconds: float, match: str = "", method: str | None = None,
              times: int | None = None) -> Fault:
        """Wait `seconds` before forwarding."""
        return self.add(Fault("delay", match, method, times, seconds=seconds))

    def throttle(self, bytes_per_sec: int, match: str = "", method: str | None = None,
                 times: int | None = None) -> Fault:
        """Stream response bodies at about `bytes_per_sec`."""
        return self.add(Fault("throttle", match, method, times, rate=bytes_per_sec))

    def release(self) -> None:
        """Let every stalled or held response go on, and stall no more (stall and hold faults
        are removed)."""
        with self._lock:
            self._faults = [f for f in self._faults if f.kind not in ("stall", "hold")]
            released, self._released = self._released, asyncio.Event()
        if self._thread is not None and self._thread.loop is not None:
            self._thread.call_soon(released.set)  # asyncio objects: touch only on their loop

    def clear_faults(self) -> None:
        self.release()
        with self._lock:
            self._faults.clear()

    # -- records (called from the test thread) -------------------------------------------

    @property
    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path+query) of every request so far, in arrival order."""
        return [(r.method, r.path) for r in self.records]

    @property
    def stalled(self) -> int:
        """How many responses are being held by a stall right now."""
        return self._stalled

    def _select(self, method: str | None, contains: str | None) -> list[Record]:
        return [r for r in self.records if (method is None or r.method == method)
                and (contains is None or contains in r.path)]

    def count(self, method: str | None = None, contains: str | None = None) -> int:
        return len(self._select(method, contains))

    def body_bytes(self, contains: str | None = None, method: str | None = None) -> int:
        """Total response body bytes sent to the client for the matching requests."""
        return sum(r.sent for r in self._select(method, contains))

    def reset(self) -> None:
        """Remove all faults, release stalls, forget the records; bring the proxy up."""
        self.clear_faults()
        with self._lock:
            self._records.clear()
        self.up()

    # -- the proxy -----------------------------------------------------------------------

    def _take_faults(self, method: str, path: str) -> tuple[dict[str, Fault], asyncio.Event]:
        """The faults for this request (first of each kind wins), each using one of its times."""
        chosen: dict[str, Fault] = {}
        with self._lock:
            for fault in self._faults:
                if fault.kind not in chosen and fault.matches(method, path):
                    chosen[fault.kind] = fault
                    if fault.times is not None:
                        fault.times -= 1
            self._faults = [f for f in self._faults if f.times is None or f.times > 0]
            # Taken under the same lock as the faults: a release() from now on sets it.
            return chosen, self._released

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.raw_path
        faults, released = self._take_faults(request.method, path)
        record = Record(request.method, path, sorted(faults))
        with self._lock:
            self._records.append(record)

        if "hold" in faults:
            await self._hold(released)
        if "delay" in faults:
            await asyncio.sleep(faults["delay"].seconds)
        if "status" in faults:
            fault = faults["status"]
            record.status, record.sent = fault.status, len(fault.body)
            return web.Response(status=fault.status, headers=fault.headers, body=fault.body)

        headers = CIMultiDict((k, v) for k, v in request.headers.items()
                              if k.lower() not in NOT_FORWARDED)
        # As nginx in front of a registry would: the URLs the registry builds (an upload's
        # Location) then lead back through this proxy instead of around it.
        headers["X-Forwarded-Host"] = request.host
        headers["X-Forwarded-Proto"] = "http"
        try:
            upstream = await self._session.request(
                request.method, URL(self.upstream + path, encoded=True),  # encoded: byte-exact
                headers=headers, allow_redirects=False,
                data=request.content if request.body_exists else None)
        except aiohttp.ClientError as err:
            record.status = 502
            return web.Response(status=502, text=f"fault proxy: upstream unreachable: {err}\n")

        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in NOT_FORWARDED:
                    response.headers.add(key, value)
            record.status = upstream.status
            await response.prepare(request)
            await self._relay(request, upstream, response, faults, released, record)
        return response

    async def _relay(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse,
                     response: web.StreamResponse, faults: dict[str, Fault],
                     released: asyncio.Event, record: Record) -> None:
        """Copy the body across, applying corrupt, stall, cut and throttle by byte offset."""
        cut, corrupt, stall = faults.get("cut"), faults.get("corrupt"), faults.get("stall")
        rate = faults["throttle"].rate if "throttle" in faults else 0

        async def send(data: bytes) -> None:
            # Throttled: small slices with a pause after each, so bytes trickle out.
            step = max(1, rate // 20) if rate else len(data) or 1
            for i in range(0, len(data), step):
                piece = data[i:i + step]
                await response.write(piece)
                record.sent += len(piece)
                if rate:
                    await asyncio.sleep(len(piece) / rate)

        pos = 0  # body offset of the start of `chunk`
        async for chunk in upstream.content.iter_chunked(CHUNK):
            if corrupt and pos <= corrupt.at < pos + len(chunk):
                flipped = bytearray(chunk)
                flipped[corrupt.at - pos] ^= 0xFF
                chunk = bytes(flipped)
            if stall and pos <= stall.at < pos + len(chunk):
                await send(chunk[:stall.at - pos])
                chunk, pos = chunk[stall.at - pos:], stall.at
                await self._hold(released)
            if cut and cut.at < pos + len(chunk):
                await send(chunk[:cut.at - pos])
                await self._abort(request)
                return
            await send(chunk)
            pos += len(chunk)
        # A stall at exactly the end of the body (e.g. after=0 on an empty one) still holds.
        if stall and stall.at == pos:
            await self._hold(released)

    async def _hold(self, released: asyncio.Event) -> None:
        self._stalled += 1
        try:
            await released.wait()
        finally:
            self._stalled -= 1

    @staticmethod
    async def _abort(request: web.BaseRequest) -> None:
        """Reset the connection, but only after what was written has left the socket:
        abort() throws away anything still buffered, and the test asked for N bytes."""
        transport = request.transport
        while transport is not None and not transport.is_closing() \
                and transport.get_write_buffer_size() > 0:
            await asyncio.sleep(0.005)
        if transport is not None:
            transport.abort()
        # handler_cancellation cancels us once the loop notices the lost connection.
        await asyncio.sleep(3600)
