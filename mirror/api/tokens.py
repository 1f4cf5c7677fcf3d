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
base64url JSON `{"sub": user or "", "exp": unix seconds, "access": [...]}` and its
HMAC-SHA256. The key is derived from `cluster.secret` when there are several replicas (each
accepts the others' tokens), else it is 32 random bytes kept in `<storage.root>/token.key`
(mode 0600), so tokens outlive a restart. A token stands for its user: access.py decides each
request by that user and the policy, exactly as for Basic credentials, and `access` only
tells the client what it was granted. Basic credentials on any request still work (curl -u).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
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

    def __init__(self, root: str | None = None, secret: str | None = None):
        self.root = Path(root) if root is not None else None
        self.secret = secret
        self._key: bytes | None = None

    def get(self) -> bytes:
        if self._key is None:
            if self.secret:
                self._key = hmac.new(self.secret.encode(), b"mirror client tokens",
                                     hashlib.sha256).digest()
            elif self.root is None:
                self._key = os.urandom(KEY_BYTES)
            else:
                self._key = self._from_file()
        return self._key

    def _from_file(self) -> bytes:
        path = self.root / KEY_FILE
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: two processes starting on one root agree on the first one's key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) != KEY_BYTES:
                raise RuntimeError(f"{path} is not a {KEY_BYTES}-byte key: delete it (logged-in "
                                   "clients then fetch new tokens)") from None
            return key
        key = os.urandom(KEY_BYTES)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return key


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

    def issue(self, user: str | None, access: list[dict]) -> dict:
        now = self.clock()
        payload = _b64(json.dumps({"sub": user or "", "exp": int(now) + TOKEN_SECONDS,
                                   "access": access}, separators=(",", ":")).encode())
        token = f"{payload}.{_b64(self._mac(payload))}"
        issued = datetime.fromtimestamp(now, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"token": token, "access_token": token, "expires_in": TOKEN_SECONDS,
                "issued_at": issued}

    def user(self, token: str) -> str | None:
        """The token's user (None: an anonymous token); Unauthorized when it is not one of
        ours or has expired, so the client fetches a new one."""
        payload, _, mac = token.partition(".")
        try:
            good = hmac.compare_digest(_unb64(mac), self._mac(payload))
            claims = json.loads(_unb64(payload)) if good else None
        except (ValueError, UnicodeDecodeError):
            claims = None
        if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int):
            raise Unauthorized("the token is not one this registry issued; fetch a new one")
        if claims["exp"] <= self.clock():
            raise Unauthorized("the token has expired; fetch a new one")
        return claims.get("sub") or None

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self.key.get(), payload.encode(), hashlib.sha256).digest()


def challenge(scheme: str, host: str, name: str | None, actions: str) -> dict[str, str]:
    """The Bearer challenge for a request on `host` (the realm is on this mirror)."""
    header = f'Bearer realm="{scheme}://{host}{PATH}",service="{SERVICE}"'
    if name:
        header += f',scope="repository:{name}:{actions}"'
    return {"WWW-Authenticate": header}
