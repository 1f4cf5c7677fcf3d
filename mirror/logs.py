"""Log lines, as readable text or one JSON object per line, and the request id of every response.

`setup(log_format)` configures the process's logging once (`mirror serve` calls it) and
returns the access logger class for aiohttp. In "json" mode every line, aiohttp's access
lines included, is one object:

    {"time": "2026-01-02T03:04:05.678+00:00", "level": "info", "logger": "aiohttp.access",
     "message": "GET /v2/ 200", "request_id": "5f0c1a2b00000007", "method": "GET",
     "path": "/v2/", "status": 200, "bytes": 2, "duration": 0.0004,
     "user_agent": "curl/8.5.0", "remote": "127.0.0.1"}

(`bytes`: the body bytes sent, as nginx's `$body_bytes_sent` — not aiohttp's `%b`, which
counts the headers and misses whatever went out by sendfile, i.e. every blob; `duration`:
seconds). Text mode writes the same count where aiohttp's `%b` would go.
A line logged while a request is handled (an upstream failure, a fill it started) carries
that request's id too: every log record gets a `request_id` attribute, which text mode
writes in brackets after the level:

    2026-01-02 03:04:05,678 WARNING [5f0c1a2b00000007] GET /v2/library/alpine/...: upstream ...

In both modes every response echoes `X-Request-Id`: the client's own when it sent a sane
one (so a proxy's or a client's id ties the lines together), else a new one.
`response_started(request)` says whether a response's headers went out, which the error
middleware needs to know before it may answer with an error.

A TLS handshake on the plain-HTTP port (a client configured with https://, or skopeo and
podman with --tls-verify=false, which try https first) gets no access line
(`"UNKNOWN / HTTP/1.0" 400` says nothing) but one warning naming the client and the fix,
at most once per client address per `TlsProbes.window`: `tls_on_plain_port`.
`startup(config, where)` is the one line that says how the server was started.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import sys
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_log import AccessLogger
from multidict import istr

if TYPE_CHECKING:
    pass

log = logging.getLogger("mirror")

HEADER = istr("X-Request-Id")  # istr: no case-folding per request
# What a client may choose as its id: printable, no spaces or quotes, not too long.
SANE_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
ACCESS_FIELDS = ("method", "path", "status", "bytes", "duration", "user_agent", "remote")
REQUEST_ID = web.RequestKey("request_id", str)
RESPONSE_STARTED = web.RequestKey("response_started", bool)
UNLOGGED = web.RequestKey("unlogged", bool)  # no access line: a warning said it better
# What aiohttp's parsers (the C one and the Python one alike) say when a request starts
# with a TLS record header (0x16 0x03): a ClientHello sent to the plain-HTTP port.
NO_BODY = (204, 304)

# A generated id: 8 hex digits drawn once per process, then a counter. Unique across
# restarts and instances without a random draw per request.
_prefix = os.urandom(4).hex()
_counter = itertools.count(1)
_current: ContextVar[str | None] = ContextVar("mirror_request_id", default=None)
_tagging = False


def new_id(request: web.BaseRequest) -> str:
    given = request.headers.get(HEADER)
    if given is not None and SANE_ID.fullmatch(given):
        return given
    return f"{_prefix}{next(_counter):08x}"


def install(app: web.Application) -> None:
    """Give every response an X-Request-Id, and every log line of a request that id."""
    _tag_records()
    app.middlewares.insert(0, _bind)
    app.on_response_prepare.append(_echo_bound)


def response_started(request: web.BaseRequest) -> bool:
    """Whether a response to `request` was prepared: its headers are (being) sent."""
    return request.get(RESPONSE_STARTED, False)


@web.middleware
async def _bind(request: web.Request, handler):
    request[REQUEST_ID] = request_id = new_id(request)
    token = _current.set(request_id)
    try:
        return await handler(request)
    finally:
        _current.reset(token)


async def _echo_bound(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[HEADER] = request.get(REQUEST_ID) or new_id(request)
    request[RESPONSE_STARTED] = True
    if BODY_SENT not in request:  # not again for the stand-in response of one cut short
        request[BODY_SENT] = counter = _Counter()
        request.writer.on_body_write = counter


class _Counter:
    """Body bytes written through aiohttp's writer (its `on_body_write` hook counts each
    chunk before the chunked encoding's framing, and never the headers)."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, size: int, _output_size: int) -> None:
        self.bytes += size


BODY_SENT = web.RequestKey("body_sent", _Counter)


def body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """The body bytes a response sent, for the access line.

    A response sent whole sent its Content-Length: aiohttp's own count cannot tell, since
    sendfile (every blob, whole or by range) bypasses its writer. A response cut short (the
    client left, a fill failed: the connection is closing) or one without a length
    (chunked) sent what went through the writer: exact for chunked bodies, a lower bound
    for a sendfile body cut short.
    """
    if request.method == "HEAD" or response.status in NO_BODY or response.status < 200:
        return 0
    transport = request.transport
    cut = transport is None or transport.is_closing()
    if response.content_length is not None and not cut:
        return response.content_length
    counter = request.get(BODY_SENT)
    return counter.bytes if counter is not None else 0


def _tag_records() -> None:
    """Make every log record carry the request id of the request it was logged for (None
    outside a request), whichever logger and handler it goes to; once per process."""
    global _tagging
    if _tagging:
        return
    _tagging = True
    make = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made = make(*args, **kwargs)
        made.request_id = _current.get()
        return made

    logging.setLogRecordFactory(record)


class TextFormatter(logging.Formatter):
    """`time LEVEL [request id] message`; lines outside a request have no brackets."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(request)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        record.request = f"[{request_id}] " if request_id else ""
        return super().format(record)


class TextAccessLogger(AccessLogger):
    """aiohttp's access line, tagged with the response's request id like every other line.
    (aiohttp logs it after the handler returned, outside the request's context.)"""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.get(UNLOGGED):
            return
        token = _current.set(response.headers.get(HEADER))
        try:
            super().log(request, response, time)
        finally:
            _current.reset(token)

    def _format_line(self, request: web.BaseRequest, response: web.StreamResponse,
                     time: float) -> list[tuple[Any, Any]]:
        # aiohttp looks its `_format_b` up on AccessLogger itself, not on a subclass:
        # `%b` (response_size) is replaced here, with the body bytes.
        return [(key, body_bytes(request, response) if key == "response_size"
                 else method(request, response, time)) for key, method in self._methods]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
                            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or _current.get()
        if request_id is not None:
            line["request_id"] = request_id
        for field in ACCESS_FIELDS:
            if field in record.__dict__:
                line[field] = record.__dict__[field]
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class JsonAccessLogger(AbstractAccessLogger):
    """aiohttp's access line as fields of a JSON log line."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.get(UNLOGGED):
            return
        token = _current.set(response.headers.get(HEADER))
        try:
            self._log(request, response, time)
        finally:
            _current.reset(token)

    def _log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s", request.method, request.path_qs, response.status, extra={
            "method": request.method,
            "path": request.path_qs,
            "status": response.status,
            "bytes": body_bytes(request, response),
            "duration": round(time, 6),
            "user_agent": request.headers.get("User-Agent"),
            "remote": request.remote,
        })


def setup(log_format: str) -> type[AbstractAccessLogger]:
    """Configure the root logger for `log_format`; the access logger class to use."""
    _tag_records()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    return JsonAccessLogger if log_format == "json" else TextAccessLogger
