"""The mirror's own token service (Docker's token authentication), used when logins are set.

Why Bearer and not Basic: Docker pulling through `registry-mirrors` treats a Basic challenge
it has no credentials for as an error and leaves the mirror for Docker Hub, so a mirror with
logins would serve no anonymous pull to a Docker node (tests/test_engine_docker.py shows it).
To a Bearer challenge every client (Docker, containerd, podman, skopeo, crane) answers the
same way: it asks the challenge's realm for a token — anonymously when it has no login, with
the login as Basic when it has one (`docker login HOST` stores it for the realm's host) — and
sends `Authorization: Bearer <token>` from then on. Docker Hub, Quay and Harbor answer so.

`GET /auth/token?service=mirror&scope=repository:NAME:pull,push` (and the OAuth2 form that
containerd POSTs with a login, `grant_type=password`) answers
`{"token", "access_token", "expires_in", "issued_at"}`. A token is `<payload>.<mac>`:
base64url JSON `{"sub": user or "", "login": a hash of the user's htpasswd entry, "exp": unix
seconds, "access": [...]}` and its HMAC-SHA256. The key is derived from `cluster.secret` and
`cluster.name` when there are several replicas (each accepts the others' tokens, another
cluster with the same secret does not), else it is 32 random bytes kept in
`<storage.root>/token.key` (mode 0600), so tokens outlive a restart. A token stands for its
user: access.py decides each request by that user and the policy, exactly as for Basic
credentials, and refuses it once the user is gone from the htpasswd file or has a new
password; `access` only tells the client what it was granted. Basic credentials on any
request still work (curl -u).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import Unauthorized

PATH = "/auth/token"
SERVICE = "mirror"
TOKEN_SECONDS = 300
KEY_FILE = "token.key"
KEY_BYTES = 32


class TokenKey:
    """The HMAC key, read or made on first use (a mirror without logins never writes it).
    Without a root (an Access built on its own) the key lives in memory only."""

    def __init__(self, root: str | None = None, secret: str | None = None, cluster: str = ""):
        self.root = Path(root) if root is not None else None
        self.secret = secret
        self.cluster = cluster
        self._key: bytes | None = None

    def get(self) -> bytes:
        if self._key is None:
            if self.secret:
                self._key = hmac.new(self.secret.encode(),
                                     b"mirror client tokens\0" + self.cluster.encode(),
                                     hashlib.sha256).digest()
            elif self.root is None:
                self._key = os.urandom(KEY_BYTES)
            else:
                self._key = self._from_file()
        return self._key

    def _from_file(self) -> bytes:
        path = self.root / KEY_FILE
        self.root.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Written whole to a side file, then linked into place: link fails if another
            # process got there first, so two processes on one root agree on the first key,
            # and nobody ever reads a half-written one.
            fd, side = tempfile.mkstemp(dir=self.root, prefix=".token.key.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(os.urandom(KEY_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
                os.link(side, path)
            except FileExistsError:
                pass
            finally:
                os.unlink(side)
        if os.stat(path).st_mode & 0o077:
            raise RuntimeError(f"{path} is readable by others: chmod 600 it (anyone who reads "
                               "it can make tokens for any user)")
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise RuntimeError(f"{path} is not a {KEY_BYTES}-byte key: stop every mirror on "
                               "this storage, delete it, start again (clients log in anew)")
        return key


TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]+")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_scopes(scopes: list[str]) -> list[tuple[str, str, list[str]]]:
    """`repository:NAME:pull,push` items as (type, name, actions); others are ignored (the
    spec lets a server grant less than asked). NAME may hold colons (`host:port/app`)."""
    parsed = []
    for scope in scopes:
        for item in scope.split(" "):
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                parsed.append((kind, name, [a for a in actions.split(",") if a]))
    return parsed


class Tokens:
    """Issues and checks the mirror's client tokens."""

    def __init__(self, key: TokenKey, clock=time.time):
        self.key = key
        self.clock = clock

    def issue(self, user: str | None, access: list[dict], login: str = "") -> dict:
        """A token for `user` (None: anonymous); `login` binds it to the user's current
        htpasswd entry, so a changed password or a removed user ends it."""
        now = self.clock()
        payload = _b64(json.dumps({"sub": user or "", "login": login,
                                   "exp": int(now) + TOKEN_SECONDS, "access": access},
                                  separators=(",", ":")).encode())
        token = f"{payload}.{_b64(self._mac(payload))}"
        issued = datetime.fromtimestamp(now, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"token": token, "access_token": token, "expires_in": TOKEN_SECONDS,
                "issued_at": issued}

    def user(self, token: str) -> tuple[str | None, str]:
        """The token's (user, login binding); user None: an anonymous token. Unauthorized
        when it is not one of ours or has expired, so the client fetches a new one."""
        payload, _, mac = token.partition(".")
        claims = None
        # The MAC is compared as the text we would write: no other spelling of the same
        # bytes (padding, ignored characters) is a token.
        if TOKEN_TEXT.fullmatch(payload) and hmac.compare_digest(
                mac.encode(), _b64(self._mac(payload)).encode()):
            try:
                claims = json.loads(_unb64(payload))
            except (ValueError, UnicodeDecodeError):
                claims = None
        if not isinstance(claims, dict) or type(claims.get("exp")) is not int \
                or not isinstance(claims.get("sub"), str) \
                or not isinstance(claims.get("login", ""), str):
            raise Unauthorized("the token is not one this registry issued; fetch a new one")
        if claims["exp"] <= self.clock():
            raise Unauthorized("the token has expired; fetch a new one")
        return claims["sub"] or None, claims.get("login", "")

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self.key.get(), payload.encode(), hashlib.sha256).digest()


# A Host header that can stand in a URL: a DNS name or IPv4 address, or [IPv6], and a port.
HOST = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])"
                  r"(?::[0-9]{1,5})?")


def realm(scheme: str, host: str, forwarded_proto: str | None, forwarded_host: str | None,
          fallback: str) -> str:
    """Where clients fetch tokens: this mirror as the client reached it. Behind a reverse
    proxy that terminates TLS, its X-Forwarded-Proto/-Host say how (else clients would send
    their passwords to http:// or to the proxy's own upstream address). A Host that is not
    a host[:port] is never written into the header; `fallback` (server.listen) is."""
    if forwarded_proto in ("http", "https"):
        scheme = forwarded_proto
    for candidate in (forwarded_host, host):
        if candidate and HOST.fullmatch(candidate):
            return f"{scheme}://{candidate}{PATH}"
    return f"{scheme}://{fallback}{PATH}"


def challenge(realm_url: str, name: str | None, actions: str) -> dict[str, str]:
    """The Bearer challenge: a token from this mirror, for `name` when it is a valid one."""
    header = f'Bearer realm="{realm_url}",service="{SERVICE}"'
    if name:
        header += f',scope="repository:{name}:{actions}"'
    return {"WWW-Authenticate": header}
