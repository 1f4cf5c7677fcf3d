"""An upstream blob body read straight from its socket on a worker thread, past aiohttp.

A lone cold pull was bounded by the event loop: aiohttp parses each body piece on the loop,
re-arms its read timer per piece and hands the bytes over, and then the store thread and the
loop take turns for the GIL (bench/README.md, "Where a lone cold pull's time goes"). So once
aiohttp has done what it is good at — auth, redirects, the status line and the headers — a
body framed by Content-Length is taken off it: whatever aiohttp already buffered is drained,
its reading is paused, and a duplicate of the socket is read with `recv_into` into one reused
buffer on the fill's own thread, where the spool write and sha256 also run without the GIL.

Only plain HTTP qualifies: a TLS session's state lives inside asyncio's SSL protocol and
cannot be moved to a thread, and a chunked or encoded body needs aiohttp's parser. Those keep
the loop path (fill.py reads `Body.chunks()`). The connection is never reused after a
detach: aiohttp sees an unfinished payload and closes it on release.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import aiohttp

from ..errors import BodyBroken
from ..metrics import UpstreamCounts


@dataclass
class RawBody:
    """The rest of a body: `head` (what aiohttp had buffered) then `remaining` socket bytes."""

    head: bytes
    remaining: int
    sock: socket.socket  # a duplicate descriptor, blocking with the stall timeout
    counts: UpstreamCounts
    stall_timeout: float
    _broke: BodyBroken | None = None  # raised by the next read, after the bytes before it

    def read_into(self, view: memoryview) -> int:
        """On the worker thread: fill `view` (or what is left of the body); bytes read.

        Raises BodyBroken when the upstream stalls for the stall timeout, resets, or closes
        before the Content-Length it promised — but only once the bytes before the break
        were returned: they are good, and a resumed fill starts after them."""
        if self._broke is not None:
            raise self._broke
        want = min(len(view), self.remaining)
        got = 0
        while got < want:
            try:
                n = self.sock.recv_into(view[got:want])
            except TimeoutError:
                self._broke = self._broken(f"no byte for {self.stall_timeout:g}s")
            except OSError as e:
                self._broke = self._broken(e.strerror or str(e))
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

    def _broken(self, why: str) -> BodyBroken:
        self.counts.errors.inc()
        return BodyBroken(f"upstream body broke off: {why}")

    def abort(self) -> None:
        """From the event loop: wake a thread blocked in recv (the fill is being stopped)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed or never connected: nothing is blocked on it

    def close(self) -> None:
        self.sock.close()


def detach(response: aiohttp.ClientResponse, counts: UpstreamCounts,
           stall_timeout: float) -> RawBody | None:
    """Take the rest of `response`'s body off aiohttp, or None when it cannot be taken.

    Called before anything of the body was read, on the event loop, with no await inside:
    nothing can arrive between draining aiohttp's buffer and pausing its reads."""
    length = response.content_length
    connection = response.connection
    if (length is None or connection is None or connection.transport is None
            or response.headers.get("Transfer-Encoding", "").lower() not in ("", "identity")
            or response.headers.get("Content-Encoding", "identity").lower() != "identity"):
        return None
    transport = connection.transport
    if transport.get_extra_info("ssl_object") is not None or transport.is_closing():
        return None
    transport_socket = transport.get_extra_info("socket")
    content = response.content
    if transport_socket is None or content.exception() is not None or content.is_eof():
        return None
    head = content.read_nowait()
    remaining = length - content.total_bytes
    if remaining < 0:
        return None  # more than promised: let aiohttp's parser say what is wrong
    connection.protocol.pause_reading()  # also stops aiohttp's own read timer
    sock = socket.socket(fileno=socket.dup(transport_socket.fileno()))
    sock.settimeout(stall_timeout)  # poll() with a deadline on each recv, as aiohttp's sock_read
    counts.bytes.inc(len(head))
    return RawBody(head, remaining, sock, counts, stall_timeout)
