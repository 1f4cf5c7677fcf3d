"""An upstream blob body read straight from its socket on a worker thread, past aiohttp.

A lone cold pull was bounded by the event loop: aiohttp parses each body piece on the loop,
re-arms its read timer per piece and hands the bytes over, and then the store thread and the
loop take turns for the GIL (bench/README.md, "Where a lone cold pull's time goes"). So once
aiohttp has done what it is good at — auth, redirects, the status line and the headers — a
body framed by Content-Length is taken off it: whatever aiohttp already buffered is drained,
its reading is paused, and a duplicate of the socket is read into one reused buffer on the
fill's own thread, where the spool write and sha256 also run without the GIL.

Over TLS the thread goes on with the connection's own TLS session: asyncio keeps it as an
`ssl.SSLObject` between two memory BIOs (asyncio/sslproto.py), and the thread feeds the
incoming BIO from the socket and decrypts with `SSLObject.read` (which releases the GIL),
after asyncio was told to stop reading at both of its layers. Those are asyncio's private
attributes: when one is missing (another Python, uvloop) the body stays with aiohttp, as a
chunked or content-encoded one always does (fill.py reads `Body.chunks()` then). The
connection is never reused after a detach: aiohttp sees an unfinished payload and closes it
on release.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field

import aiohttp

from ..errors import BodyBroken
from ..metrics import UpstreamCounts

# How long one wait for the socket lasts: the thread looks at `stopping` this often, so a
# stopped fill's thread ends within it (a shutdown() would wake it at once, but would also
# make asyncio tear down a TLS session the thread may still be inside).
TICK = 0.25
TLS_RECV = 256 * 1024


@dataclass
class TlsSession:
    """asyncio's TLS state of one connection, driven from the thread once detached."""

    sslobj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO


@dataclass
class RawBody:
    """The rest of a body: `head` (what aiohttp had buffered) then `remaining` socket bytes."""

    head: bytes
    remaining: int
    sock: socket.socket  # a duplicate descriptor with a TICK timeout
    counts: UpstreamCounts
    stall_timeout: float
    transport: object = None  # aiohttp's, aborted at close: the connection is done with
    tls: TlsSession | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    _broke: BodyBroken | None = None  # raised by the next read, after the bytes before it

    def read_into(self, view: memoryview) -> int:
        """On the worker thread: fill `view` (or what is left of the body); bytes read, 0
        when `stopping` was set.

        Raises BodyBroken when the upstream stalls for the stall timeout, resets, or closes
        before the Content-Length it promised — but only once the bytes before the break
        were returned: they are good, and a resumed fill starts after them."""
        if self._broke is not None:
            raise self._broke
        want = min(len(view), self.remaining)
        got = 0
        while got < want and not self.stopping.is_set():
            try:
                n = self._read(view[got:want])
            except TimeoutError:
                self._broke = self._broken(f"no byte for {self.stall_timeout:g}s")
            except (OSError, ssl.SSLError) as e:
                self._broke = self._broken(getattr(e, "strerror", None) or str(e))
            else:
                if n == 0:
                    self._broke = self._broken(f"the connection closed with "
                                               f"{self.remaining - got} bytes still to come")
                got += n
            if self._broke is not None:
                if not got:
                    raise self._broke
                break
        self.remaining -= got
        self.counts.bytes.inc(got)
        return got

    def _read(self, view: memoryview) -> int:
        """Bytes of the body into `view`: > 0, or 0 at the end of the stream (or when
        stopping); TimeoutError after stall_timeout without a byte."""
        if self.tls is None:
            return self._recv(lambda: self.sock.recv_into(view))
        tls = self.tls
        while True:
            try:
                n = tls.sslobj.read(len(view), view)
            except ssl.SSLWantReadError:
                data = self._recv(lambda: self.sock.recv(TLS_RECV))
                if not data:
                    return 0
                tls.incoming.write(data)
                continue
            except ssl.SSLZeroReturnError:  # the peer's close_notify
                return 0
            if tls.outgoing.pending:  # a post-handshake answer (key update), rare
                self.sock.sendall(tls.outgoing.read())
            return n

    def _recv(self, receive):
        """One receive, waited for in TICKs until stall_timeout; 0 / b"" when stopping."""
        waited = 0.0
        while True:
            try:
                return receive()
            except TimeoutError:
                waited += TICK
                if self.stopping.is_set():
                    return 0
                if waited >= self.stall_timeout:
                    raise

    def _broken(self, why: str) -> BodyBroken:
        self.counts.errors.inc()
        return BodyBroken(f"upstream body broke off: {why}")

    def stop(self) -> None:
        """From the event loop: the thread ends within TICK (the fill is being stopped)."""
        self.stopping.set()

    def close(self) -> None:
        """On the loop, after the thread ended: drop the connection at once (a TLS close
        would wait for the peer's close_notify on a socket nobody reads any more)."""
        self.sock.close()
        if self.transport is not None:
            self.transport.abort()


def detach(response: aiohttp.ClientResponse, counts: UpstreamCounts,
           stall_timeout: float) -> RawBody | None:
    """Take the rest of `response`'s body off aiohttp, or None when it cannot be taken.

    Called before anything of the body was read, on the event loop, with no await inside:
    nothing can arrive between draining aiohttp's buffers and pausing their reads."""
    length = response.content_length
    connection = response.connection
    if (length is None or connection is None or connection.transport is None
            or response.headers.get("Transfer-Encoding", "").lower() not in ("", "identity")
            or response.headers.get("Content-Encoding", "identity").lower() != "identity"):
        return None
    transport = connection.transport
    transport_socket = transport.get_extra_info("socket")
    content = response.content
    if (transport.is_closing() or transport_socket is None or content.exception() is not None
            or content.is_eof() or length < content.total_bytes):
        return None
    tls = None
    if transport.get_extra_info("ssl_object") is not None:
        tls = _take_tls(transport)
        if tls is None:
            return None
    head = content.read_nowait()
    remaining = length - content.total_bytes
    connection.protocol.pause_reading()  # also stops aiohttp's own read timer
    sock = socket.socket(fileno=socket.dup(transport_socket.fileno()))
    sock.settimeout(TICK)
    counts.bytes.inc(len(head))
    return RawBody(head, remaining, sock, counts, stall_timeout, transport, tls)


def _take_tls(transport) -> TlsSession | None:
    """Stop asyncio reading a TLS connection at both layers and hand over its session; None
    (nothing changed) when this asyncio keeps it differently."""
    protocol = getattr(transport, "_ssl_protocol", None)
    names = ("_sslobj", "_incoming", "_outgoing", "_transport", "_app_reading_paused",
             "_ssl_reading_paused")
    if protocol is None or not all(hasattr(protocol, name) for name in names):
        return None
    sslobj, tcp = protocol._sslobj, protocol._transport
    if not isinstance(sslobj, ssl.SSLObject) or tcp is None or protocol._outgoing.pending:
        return None
    # The app layer first (no more decrypted bytes to aiohttp), then the socket. Marked as
    # not paused by its own flow control, so that draining the incoming BIO on the thread
    # never makes asyncio resume the socket (_control_ssl_reading resumes only what it
    # paused itself).
    protocol._app_reading_paused = True
    protocol._ssl_reading_paused = False
    tcp.pause_reading()
    return TlsSession(sslobj, protocol._incoming, protocol._outgoing)
