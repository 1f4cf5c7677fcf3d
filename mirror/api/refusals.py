"""The access policy's refusals, kept for the status page's denials panel (ops/events.py).

A 401 is kept when the request carried credentials (a wrong password, a token this mirror
no longer honours) or asked the token service itself (an anonymous client where
`anonymous_pull = false`). A bare request's 401 is not: it is the challenge every Docker
and containerd pull starts with. Only the user name given is kept, never the password or
the token.
"""

from __future__ import annotations

from aiohttp import web

from .. import metrics
from ..errors import RegistryError
from . import tokens
from .logins import basic_credentials


def record_refusal(request: web.Request, error: RegistryError) -> None:
    header = request.headers.get("Authorization", "").strip()
    if not header and request.path != tokens.PATH:
        return
    app_metrics = request.app.get(metrics.METRICS)
    if app_metrics is None:
        return
    app_metrics.events.denied("auth", _user(header), request.remote,
                              f"{request.method} {request.path}", error.message)


def _user(header: str) -> str | None:
    """The Basic user name given; None (anonymous) for a token or no credentials."""
    try:
        credentials = basic_credentials(header) if header.lower().startswith("basic") else None
    except RegistryError:  # unreadable credentials name nobody
        return None
    return credentials[0] if credentials else None
