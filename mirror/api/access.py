"""Who may do what: client logins from an htpasswd file, and the pull / push policy.

Without `access.htpasswd` anyone may pull; pushes and deletes are taken only from loopback
clients (127.0.0.0/8, ::1), so a mirror listening on 0.0.0.0 cannot be written to from the
network until logins are set up, or `access.anonymous_push = true` says it may (a warning
at start). With an htpasswd file:
- `GET /v2/` answers 401 with a Bearer challenge until a token or a login is given:
  Docker sends credentials only after its ping was challenged, and never retries a 401
  that a ping answered with 200 did not announce. The realm is this mirror's own token
  service (tokens.py), which gives anonymous clients a token when `anonymous_pull` allows
  it — a Basic challenge would send Docker's `registry-mirrors` pulls to Docker Hub;
- pulls need a login unless `anonymous_pull`; pushes and deletes always do, by a user in
  `push_users` (or any user when that list is empty);
- empty credentials (`Basic Og==`, what podman, CRI-O, skopeo and buildah send after a
  Basic challenge when they have none) are anonymous, exactly like no header;
- Basic credentials are taken on every request too (curl -u, scripts);
- wrong credentials are a 401 with the challenge, whatever the request; more than
  `login_failures_per_minute` of them from one address get 429 without a password check.
`read_only` refuses every push and delete. Password checks are slow on purpose (bcrypt,
~0.1-0.6 s), so they run on two threads of their own, never the loop's default executor
that blob writes use; an unknown user costs a check against a dummy hash, so timing does
not tell which names exist; a successful check is remembered for a few minutes. The
htpasswd formats (bcrypt, apr1, SHA1) and the refused ones are in htpasswd.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from .. import config as cfg
from ..cache.flights import Flights
from ..errors import (
    Denied,
    NameInvalid,
    NameUnknown,
    TokenRequestInvalid,
    TooManyRequests,
    Unauthorized,
    Unsupported,
)
from ..reference import parse_name
from . import tokens
from .htpasswd import dummy_entry, read_htpasswd, verify
from .logins import Failures, basic_credentials, client_key, is_loopback
from .refusals import record_refusal
from .tokens import TokenKey, Tokens

log = logging.getLogger("mirror")

TOKEN_FORM_MAX = 8192  # bytes of a token POST

# The token service's own challenge: it takes logins as Basic credentials only.
CHALLENGE = {"WWW-Authenticate": 'Basic realm="mirror"'}
PULL_METHODS = ("GET", "HEAD")
# Liveness and readiness probes (Kubernetes) carry no credentials and reveal nothing.
OPEN_PATHS = ("/healthz", "/readyz")
PEER_PATH = "/_mirror/"
PUSH_FIX = ("add a login with `mirror user add NAME` and set access.htpasswd, "
            "or set access.anonymous_push = true")
REMEMBER_SECONDS = 300.0
REMEMBERED = 1024          # successful logins remembered at most
PENDING_CHECKS = 64        # distinct password checks queued at once; more get 429
# --- The policy ---------------------------------------------------------------------------

class Access:
    def __init__(self, config: cfg.Access, key: TokenKey | None = None):
        self.config = config
        self.users = read_htpasswd(config.htpasswd) if config.htpasswd else None
        self.tokens = Tokens(key or TokenKey())
        self._dummy = dummy_entry(self.users or {})
        self.failures = Failures(config.login_failures_per_minute)
        # Threads start on the first check; two keep a password flood off blob writes.
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mirror-login")
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        # Concurrent requests with the same credentials (a fleet starting) share one check.
        self._checks = Flights()

    async def user(self, request: web.Request, bearer: bool = True) -> str | None:
        """The logged-in user, None when anonymous (or an anonymous token); Unauthorized for
        wrong credentials or a token this mirror did not issue."""
        if self.users is None:
            return None
        header = request.headers.get("Authorization")
        scheme, _, token = (header or "").strip().partition(" ")
        if bearer and scheme.lower() == "bearer":
            user, login = self.tokens.user(token.strip())
            entry = self.users.get(user) if user is not None else None
            if user is not None and (entry is None or login != _login(entry.hashed)):
                raise Unauthorized("the login this token was issued for has changed (a new "
                                   "password, or the user was removed); log in again")
            return user
        credentials = basic_credentials(header)
        if credentials is None:
            return None
        return await self.login(*credentials, client_key(request.remote))

    async def login(self, name: str, password: bytes, client: str) -> str:
        """`name` when the password is right; Unauthorized (or 429 past the limit) if not."""
        self.failures.begin(client)
        try:
            ok = await self._check(name, password)
        except TooManyRequests:  # too many checks queued: this one never ran
            self.failures.end(client, failed=False)
            raise
        except BaseException:  # a client that hangs up mid-check still used an attempt
            self.failures.end(client, failed=True)
            raise
        self.failures.end(client, failed=not ok)
        if not ok:
            raise Unauthorized("wrong user name or password")
        return name

    async def _check(self, name: str, password: bytes) -> bool:
        entry = self.users.get(name)
        key = hashlib.sha256(name.encode() + b"\0" + password + b"\0" +
                             (entry.hashed.encode() if entry else b"")).digest()
        if entry is not None and self._verified.get(key, 0.0) > time.monotonic():
            return True
        if key not in self._checks and len(self._checks) >= PENDING_CHECKS:
            raise TooManyRequests("too many logins are being checked; try again",
                                  headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        ok = await self._checks.run(key, lambda: loop.run_in_executor(
            self.executor, verify, entry or self._dummy, password)) and entry is not None
        if ok:
            self._verified[key] = time.monotonic() + REMEMBER_SECONDS
            self._verified.move_to_end(key)
            while len(self._verified) > REMEMBERED:
                self._verified.popitem(last=False)
        return ok

    def may_push(self, user: str | None) -> bool:
        return (user is not None and not self.config.read_only
                and (not self.config.push_users or user in self.config.push_users))

    async def authorize(self, request: web.Request) -> None:
        """Raise unless this request is allowed, by its method and the policy."""
        if (request.path in OPEN_PATHS or request.path.startswith(PEER_PATH)
                or request.path == tokens.PATH):
            return  # probes; replicas, which sign their requests (api/peers.py); the token
            # service, which checks its logins itself
        user = await self.user(request)
        if request.method in PULL_METHODS:
            # The ping is challenged until the client shows a token (an anonymous one too)
            # or a login: that is what makes Docker fetch a token at all.
            ping = request.path.endswith("/v2/") and not request.headers.get(
                "Authorization", "").lower().startswith("bearer ")
            if self.users is not None and user is None and (ping or not self.config.anonymous_pull):
                raise Unauthorized("log in to pull from this registry")
            return
        if self.config.read_only:
            raise Unsupported("this registry is read-only (access.read_only = true)")
        if self.users is None:
            if not (self.config.anonymous_push or is_loopback(request.remote)):
                raise Denied(f"pushes and deletes are taken only from this host; {PUSH_FIX}")
            return
        if user is None:
            raise Unauthorized("log in to push to this registry")
        if not self.may_push(user):
            raise Denied(f"user {user} may not push here (access.push_users)")

    def challenge(self, request: web.Request) -> dict[str, str]:
        """What a 401 asks for: a token from this mirror, for the request's repository; a
        login (Basic) on the token service and on the status pages, which browsers open and
        registry clients never ask."""
        if request.path == tokens.PATH or "/v2/" not in request.path:
            return CHALLENGE
        actions = "pull" if request.method in PULL_METHODS else "pull,push"
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        local = (f"[{sockname[0]}]:{sockname[1]}" if ":" in sockname[0]
                 else f"{sockname[0]}:{sockname[1]}") if sockname else "localhost"
        realm = tokens.realm(request.scheme, request.host,
                             request.headers.get("X-Forwarded-Proto"),
                             request.headers.get("X-Forwarded-Host"), local)
        name = request.match_info.get("name")
        try:
            name = parse_name(name) if name else None
        except NameInvalid:  # never write what is not a name into the header
            name = None
        return tokens.challenge(realm, name, actions)

    async def token(self, request: web.Request) -> web.Response:
        """`GET /auth/token` (Docker's token spec) and the OAuth2 password grant containerd
        POSTs: a token for the login given (or none), granting what the policy allows."""
        if self.users is None:
            raise NameUnknown("this registry has no logins (access.htpasswd), so no tokens")
        if request.method == "POST":
            # Only the small urlencoded form OAuth2 defines: no multipart parts spooled to
            # disk for anyone who asks.
            if request.content_type != "application/x-www-form-urlencoded" or \
                    (request.content_length or 0) > TOKEN_FORM_MAX:
                raise TokenRequestInvalid("POST an application/x-www-form-urlencoded form of "
                                          f"at most {TOKEN_FORM_MAX} bytes")
            form = await request.post()
            if form.get("grant_type") != "password":
                # OAuth2's answer; containerd then asks again with GET and Basic credentials.
                raise TokenRequestInvalid("only grant_type=password is supported here")
            user = await self.login(str(form.get("username", "")),
                                    str(form.get("password", "")).encode(),
                                    client_key(request.remote))
            scopes = [str(form.get("scope", ""))]
        elif request.method == "GET":
            user = await self.user(request, bearer=False)
            scopes = request.query.getall("scope", [])
        else:
            raise Unsupported(f"{request.method} {tokens.PATH}: use GET or POST")
        if user is None and not self.config.anonymous_pull:
            raise Unauthorized("log in to pull from this registry")
        granted = []
        for kind, name, actions in tokens.parse_scopes(scopes):
            allowed = [a for a in actions
                       if (a == "pull" and (user is not None or self.config.anonymous_pull))
                       or (a in ("push", "delete", "*") and self.may_push(user))]
            if allowed:
                granted.append({"type": kind, "name": name, "actions": allowed})
        login = _login(self.users[user].hashed) if user is not None else ""
        return web.json_response(self.tokens.issue(user, granted, login),
                                 headers={"Cache-Control": "no-store"})

    def middleware(self):
        """The aiohttp middleware that applies this policy to every request."""
        open_pulls = self.users is None  # without logins a pull needs no check at all

        @web.middleware
        async def authorize(request: web.Request, handler):
            try:
                if not (open_pulls and request.method in PULL_METHODS):
                    await self.authorize(request)
                return await handler(request)
            except Unauthorized as e:  # from the policy or the token service: say what to do
                record_refusal(request, e)  # for the status page's denials panel
                e.headers = {**e.headers, **self.challenge(request)}
                raise
        return authorize

    def install(self, app: web.Application) -> None:
        """Say the push policy at start; stop the password-check threads with the app."""
        app.on_startup.append(self._announce)
        app.on_cleanup.append(self._close)

    async def _announce(self, app: web.Application) -> None:
        if self.users is not None or self.config.read_only:
            return
        if self.config.anonymous_push:
            log.warning("access.anonymous_push = true and no access.htpasswd: anyone who "
                        "can reach this mirror may push and delete images")
        else:
            log.info("no access.htpasswd: pushes and deletes are taken only from this host; "
                     "for other hosts %s", PUSH_FIX)

    async def _close(self, app: web.Application) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _login(hashed: str) -> str:
    """What binds a token to a login: a short hash of the user's htpasswd entry, so a new
    password or a removed user ends the tokens issued before (the hash reveals nothing)."""
    return hashlib.sha256(b"mirror token login\0" + hashed.encode()).hexdigest()[:16]
