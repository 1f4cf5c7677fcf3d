"""The latest refused logins and failed pulls, for the status page's "Denials and failures"
panel: so "why did my node fail to pull" is answered on one page.

`Events` keeps two bounded rings (newest first, `LIMIT` each): `denials`, the 401s the
access policy answered to a request that carried credentials or asked for a token (a bare
request's 401 is the normal first step of the token flow, not a refusal: every Docker and
containerd pull starts with one), and `failures`, the pull requests (manifest, blob, tags,
referrers) answered 429 or 5xx, with the status, the upstream, the repository and the
error's own message. The pull rules, signature rules and the scanner keep their denials
themselves (`recent` in trust/rules.py, trust/signatures.py, trust/scanner.py); the panel
merges them with these. Nothing secret is kept: a user name (never a password or a token),
a client address, a repository, and messages the mirror wrote itself.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass

LIMIT = 100          # entries per ring
MESSAGE_LIMIT = 300  # characters of a message kept
PULL_ROUTES = ("manifest", "blob", "tags", "referrers")


@dataclass(frozen=True)
class Denial:
    """One refused request: by the access policy ("auth"), a pull rule ("policy"), a
    signature rule ("signature") or the scanner gate ("scanner")."""

    at: float
    kind: str
    user: str      # the login name given, or "anonymous"
    client: str    # the client's address
    subject: str   # the repository (and reference), or the path for a login refusal
    reason: str    # the rule, or the message the client was sent

    def document(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Failure:
    """One pull answered with an error the mirror could not avoid (the upstream's)."""

    at: float
    status: int
    upstream: str  # "-" when the request named no upstream the mirror serves
    repository: str
    reference: str
    message: str

    def document(self) -> dict:
        return asdict(self)


class Events:
    def __init__(self, limit: int = LIMIT) -> None:
        self.denials: deque[Denial] = deque(maxlen=limit)
        self.failures: deque[Failure] = deque(maxlen=limit)

    def denied(self, kind: str, user: str | None, client: str | None, subject: str,
               reason: str) -> None:
        self.denials.appendleft(Denial(time.time(), kind, user or "anonymous", client or "-",
                                       subject, reason[:MESSAGE_LIMIT]))

    def failed(self, status: int, upstream: str, repository: str, reference: str,
               message: str) -> None:
        self.failures.appendleft(Failure(time.time(), status, upstream, repository, reference,
                                         message[:MESSAGE_LIMIT]))


def is_failure(route: str, status: int) -> bool:
    """Whether a response is a failed pull worth listing: 429 or 5xx on a pull route."""
    return route in PULL_ROUTES and (status == 429 or status >= 500)


def error_message(body: object) -> str:
    """The first message of a rendered registry error body; "" when it has none."""
    if not isinstance(body, (bytes, bytearray)):
        return ""
    try:
        errors = json.loads(body).get("errors") or [{}]
        return str(errors[0].get("message") or "")
    except (ValueError, AttributeError, TypeError, IndexError):
        return ""
