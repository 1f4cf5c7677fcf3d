"""Client connections: what one connection may send, and for how long, before it is answered.

aiohttp bounds the request line and each header field (`limits.max_line_size`,
`limits.max_field_size`) and closes a connection idle between requests
(`limits.keepalive_timeout`) — all three passed as `handler_args`. It has no deadline for the
headers themselves, which is what a slowloris client exploits: hundreds of connections that
each send one header line now and then. (aiohttp 3.14's keep-alive timer does run while a
request's headers arrive — from the connection's start or the previous response — but at the
keep-alive length, and undocumented; a header_timeout longer than keepalive_timeout is
therefore cut to it.) `Connection` adds the deadline, as Go's ReadHeaderTimeout and
hyper's header_read_timeout do: a request's headers must be complete `limits.header_timeout`
seconds after the connection opened (its first request) or after their first byte arrived
(later requests); if not, the client gets 408 with OCI error JSON — or, if it never sent a
byte, just the closed connection — and the connection is closed.

A request aiohttp's parser refuses (a line past its limit, too many headers, not HTTP at
all, a TLS ClientHello on the plain port) is answered with OCI error JSON and one log line,
where aiohttp would answer text/plain and log a traceback for each.

aiohttp offers no setting for the protocol class of an Application's connections, so
`Application` overrides the one factory that builds them (`_make_handler`); everything
else is aiohttp's own.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from ..config import Limits
from ..errors import HeadersTooLarge, RegistryError, RequestInvalid, RequestTimeout
from .tls_probes import tls_on_plain_port

log = logging.getLogger("mirror")

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")


def handler_args(limits: Limits) -> dict[str, Any]:
    """The per-connection settings of aiohttp's request handler, from the config."""
    return {"max_line_size": limits.max_line_size, "max_field_size": limits.max_field_size,
            "keepalive_timeout": limits.keepalive_timeout,
            "header_timeout": limits.header_timeout}


class Connection(RequestHandler):
    """aiohttp's handler of one client connection, with a deadline for each request's headers
    and OCI error JSON for the requests its parser refuses."""

    __slots__ = ("_header_deadline", "_header_started", "_header_timeout")

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_deadline: Any = None  # asyncio.TimerHandle while headers are awaited
        self._header_started = False  # whether a byte of the awaited request has arrived

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()  # a connection's first request: its headers are due from the start

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        waiting = self._waiting_for_headers()
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            # A request's headers are complete (or were refused): it is underway, and its
            # body is not bound by this deadline. A pipelined next request that arrived in
            # the same read is bound by aiohttp's keep-alive timer.
            self._disarm()
        elif data and waiting:
            self._header_started = True
            if self._header_deadline is None:
                self._arm()

    def _waiting_for_headers(self) -> bool:
        """Whether the connection waits for the next request's headers (not in a request)."""
        if self._request_count == 0:
            return True
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _arm(self) -> None:
        if self._header_timeout > 0:
            self._header_deadline = self._loop.call_later(self._header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        self._header_started = False

    def _expire(self) -> None:
        self._header_deadline = None
        transport = self.transport
        if transport is None or transport.is_closing() or not self._waiting_for_headers():
            return
        if self._header_started:
            log.info("closing a connection from %s: its request headers took longer than "
                     "%gs", self.peername, self._header_timeout)
            transport.write(_raw_response(RequestTimeout(
                f"the request headers did not arrive within {self._header_timeout:g}s "
                "(limits.header_timeout)")))
        self.force_close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The response to a request aiohttp refused or a handler that raised: OCI JSON."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun; no error response can follow")
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            error: RegistryError = RegistryError(
                "internal error; the mirror's log has the details")
            error.status = status
        elif isinstance(exc, LineTooLong):
            error = HeadersTooLarge(
                f"the request line or a header field is too long (limits.max_line_size "
                f"{self.max_line_size}, limits.max_field_size {self.max_field_size} bytes)")
        else:
            reason = getattr(exc, "message", None) or message or "malformed request"
            error = RequestInvalid(f"the request could not be parsed: {str(reason)[:200]}")
            error.status = status if 400 <= status < 500 else 400
        # A TLS handshake on this plain port is one warning saying what to do (logs.py), at
        # most once per client, and no access line.
        if status < 500 and not tls_on_plain_port(request, exc):
            log.info("refused a request from %s: %s", request.remote, error.message)
        response = error.response()
        response.headers[API_VERSION[0]] = API_VERSION[1]
        response.force_close()
        return response


def _raw_response(error: RegistryError) -> bytes:
    """An error response as bytes, for when no request object exists to answer through."""
    body = json.dumps({"errors": [{"code": error.code, "message": error.message,
                                   "detail": error.detail}]}).encode()
    reason = {408: "Request Timeout"}.get(error.status, "Error")
    return (f"HTTP/1.1 {error.status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            f"{API_VERSION[0]}: {API_VERSION[1]}\r\n\r\n").encode() + body


class Server(web.Server):
    """aiohttp's low-level server, making a `Connection` for each client."""

    def __call__(self) -> Connection:
        return Connection(self, loop=self._loop, **self._kwargs)


with warnings.catch_warnings():
    # aiohttp discourages subclassing Application in favour of composition; this subclass
    # only replaces the factory of its connections, for which aiohttp has no other hook.
    warnings.simplefilter("ignore", DeprecationWarning)

    class Application(web.Application):
        """A web.Application whose connections are `Connection`s, configured by `limits`."""

        def __init__(self, limits: Limits, **kwargs: Any):
            super().__init__(handler_args=handler_args(limits), **kwargs)

        def _make_handler(self, **kwargs: Any) -> web.Server:
            server = super()._make_handler(**kwargs)
            return Server(server.request_handler, request_factory=server.request_factory,
                          handler_cancellation=server.handler_cancellation,
                          loop=server._loop, **server._kwargs)
