"""Who may do what: client logins from an htpasswd file, and the pull / push policy.

Without `access.htpasswd` anyone may pull and push (a plain `registry:2`). With it:
- `GET /v2/` asks for a login (401 with `WWW-Authenticate: Basic`) until one is given:
  Docker sends credentials only after its ping was challenged, and never retries a 401
  that a ping answered with 200 did not announce;
- pulls need a login unless `anonymous_pull`; pushes and deletes always do, by a user in
  `push_users` (or any user when that list is empty);
- wrong credentials are a 401 with the challenge, whatever the request.
`read_only` refuses every push and delete. bcrypt checks are slow on purpose (~0.1 s), so
a successful one is remembered for a few minutes, keyed by a hash of the credentials.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from pathlib import Path

import bcrypt
from aiohttp import web

from .. import config as cfg
from ..errors import Denied, Unauthorized, Unsupported

CHALLENGE = {"WWW-Authenticate": 'Basic realm="mirror"'}
REMEMBER_SECONDS = 300.0
PULL_METHODS = ("GET", "HEAD")
# Liveness and readiness probes (Kubernetes) carry no credentials and reveal nothing.
OPEN_PATHS = ("/healthz", "/readyz")


def read_htpasswd(path: str | Path) -> dict[str, bytes]:
    users = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        name, sep, hashed = line.strip().partition(":")
        if sep and name and not name.startswith("#"):
            users[name] = hashed.encode()
    return users


def add_user(path: str | Path, name: str, password: str) -> bool:
    """Add or replace `name` in an htpasswd file (bcrypt); True when it was new."""
    if not name or ":" in name or any(c.isspace() for c in name):
        raise ValueError(f"invalid user name {name!r}: no colons or spaces")
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [line for line in lines if line.partition(":")[0] != name]
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("\n".join(kept + [f"{name}:{hashed}"]) + "\n", encoding="utf-8")
    temporary.chmod(0o600)
    temporary.replace(path)  # never a half-written password file
    return len(kept) == len(lines)


class Access:
    def __init__(self, config: cfg.Access):
        self.config = config
        self.users = read_htpasswd(config.htpasswd) if config.htpasswd else None
        self._verified: dict[bytes, float] = {}

    async def user(self, request: web.Request) -> str | None:
        """The logged-in user, None when anonymous; Unauthorized for wrong credentials."""
        header = request.headers.get("Authorization", "")
        if self.users is None or not header:
            return None
        scheme, _, encoded = header.partition(" ")
        try:
            name, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            name = password = ""
        if scheme.lower() != "basic" or not await self._check(name, password):
            raise Unauthorized("wrong user name or password", headers=CHALLENGE)
        return name

    async def _check(self, name: str, password: str) -> bool:
        hashed = self.users.get(name)
        if hashed is None:
            return False
        key = hashlib.sha256(f"{name}\0{password}\0".encode() + hashed).digest()
        if self._verified.get(key, 0) > time.monotonic():
            return True
        ok = await asyncio.get_running_loop().run_in_executor(
            None, bcrypt.checkpw, password.encode(), hashed)
        if ok:
            self._verified[key] = time.monotonic() + REMEMBER_SECONDS
        return ok

    async def authorize(self, request: web.Request) -> None:
        """Raise unless this request is allowed, by its method and the policy."""
        if request.path in OPEN_PATHS:
            return
        user = await self.user(request)
        if request.method in PULL_METHODS:
            ping = request.path.endswith("/v2/")
            if self.users is not None and user is None and (ping or not self.config.anonymous_pull):
                raise Unauthorized("log in to pull from this registry", headers=CHALLENGE)
            return
        if self.config.read_only:
            raise Unsupported("this registry is read-only (access.read_only = true)")
        if self.users is None:
            return
        if user is None:
            raise Unauthorized("log in to push to this registry", headers=CHALLENGE)
        if self.config.push_users and user not in self.config.push_users:
            raise Denied(f"user {user} may not push here (access.push_users)")

    def middleware(self):
        """The aiohttp middleware that applies this policy to every request."""
        @web.middleware
        async def authorize(request: web.Request, handler):
            await self.authorize(request)
            return await handler(request)
        return authorize
