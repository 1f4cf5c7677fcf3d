"""Who may do what: client logins from an htpasswd file, and the pull / push policy.

Without `access.htpasswd` anyone may pull; pushes and deletes are taken only from loopback
clients (127.0.0.0/8, ::1), so a mirror listening on 0.0.0.0 cannot be written to from the
network until logins are set up, or `access.anonymous_push = true` says it may (a warning
at start). With an htpasswd file:
- `GET /v2/` asks for a login (401 with `WWW-Authenticate: Basic`) until one is given:
  Docker sends credentials only after its ping was challenged, and never retries a 401
  that a ping answered with 200 did not announce;
- pulls need a login unless `anonymous_pull`; pushes and deletes always do, by a user in
  `push_users` (or any user when that list is empty);
- empty credentials (`Basic Og==`, what podman, CRI-O, skopeo and buildah send after a
  Basic challenge when they have none) are anonymous, exactly like no header;
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
import base64
import functools
import hashlib
import ipaddress
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from .. import config as cfg
from ..cache.flights import Flights
from ..errors import Denied, TooManyRequests, Unauthorized, Unsupported
from .htpasswd import dummy_entry, read_htpasswd, verify

log = logging.getLogger("mirror")

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
FAILURE_WINDOW = 60.0
FAILURE_ADDRESSES = 10_000  # client addresses whose failures are tracked at most
# --- One request's credentials and address ------------------------------------------------

def basic_credentials(header: str | None) -> tuple[str, bytes] | None:
    """(user, password) from an Authorization header; None when anonymous (no header, or
    the empty `Basic Og==` of containers/image); Unauthorized when it cannot be read."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized("only Basic credentials are accepted here", headers=CHALLENGE)
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII character
        raise Unauthorized("malformed Basic credentials", headers=CHALLENGE) from None
    name, sep, password = decoded.partition(b":")
    if not sep:
        raise Unauthorized("malformed Basic credentials (no colon)", headers=CHALLENGE)
    if not name and not password:
        return None
    try:
        return name.decode("utf-8"), password
    except UnicodeDecodeError:
        raise Unauthorized("the user name is not UTF-8", headers=CHALLENGE) from None


@functools.lru_cache(maxsize=4096)  # parsing an address costs more than the rest of a check
def is_loopback(remote: str | None) -> bool:
    """127.0.0.0/8, ::1 and ::ffff:127.x are this host; anything else (or no address) is not."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def client_key(remote: str | None) -> str:
    """Whose failures these are: the IPv4 address, or the IPv6 /64 (one host's share)."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


class Failures:
    """Failed logins per client in the last minute, for at most FAILURE_ADDRESSES clients
    (the least recently failing are forgotten first). Checks in progress count as failures
    until they succeed, so a burst of concurrent guesses cannot outrun the limit."""

    def __init__(self, limit: int, clock=time.monotonic):
        self.limit = limit
        self.clock = clock
        self._times: OrderedDict[str, deque[float]] = OrderedDict()
        self._checking: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._times)

    def begin(self, client: str) -> None:
        """Raise TooManyRequests when `client` has used up its attempts; else count one."""
        times = self._times.get(client, ())
        now = self.clock()
        recent = [t for t in times if now - t < FAILURE_WINDOW]
        if len(recent) + self._checking[client] >= self.limit:
            wait = math.ceil(recent[0] + FAILURE_WINDOW - now) if recent else 1
            raise TooManyRequests(
                f"too many failed logins from this address; try again in {wait} s",
                headers={"Retry-After": str(max(wait, 1))})
        self._checking[client] += 1

    def end(self, client: str, failed: bool) -> None:
        self._checking[client] -= 1
        if self._checking[client] <= 0:
            del self._checking[client]
        if not failed:
            return
        times = self._times.pop(client, None) or deque(maxlen=self.limit)
        times.append(self.clock())
        self._times[client] = times
        if sum(self.clock() - t < FAILURE_WINDOW for t in times) == self.limit:
            log.warning("%d failed logins from %s within a minute: its logins get 429 for "
                        "a while", self.limit, client)
        while len(self._times) > FAILURE_ADDRESSES:
            self._times.popitem(last=False)


# --- The policy ---------------------------------------------------------------------------

class Access:
    def __init__(self, config: cfg.Access):
        self.config = config
        self.users = read_htpasswd(config.htpasswd) if config.htpasswd else None
        self._dummy = dummy_entry(self.users or {})
        self.failures = Failures(config.login_failures_per_minute)
        # Threads start on the first check; two keep a password flood off blob writes.
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mirror-login")
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        # Concurrent requests with the same credentials (a fleet starting) share one check.
        self._checks = Flights()

    async def user(self, request: web.Request) -> str | None:
        """The logged-in user, None when anonymous; Unauthorized for wrong credentials."""
        if self.users is None:
            return None
        credentials = basic_credentials(request.headers.get("Authorization"))
        if credentials is None:
            return None
        name, password = credentials
        client = client_key(request.remote)
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
            raise Unauthorized("wrong user name or password", headers=CHALLENGE)
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

    async def authorize(self, request: web.Request) -> None:
        """Raise unless this request is allowed, by its method and the policy."""
        if request.path in OPEN_PATHS or request.path.startswith(PEER_PATH):
            return  # probes; replicas, which sign their requests (api/peers.py)
        user = await self.user(request)
        if request.method in PULL_METHODS:
            ping = request.path.endswith("/v2/")
            if self.users is not None and user is None and (ping or not self.config.anonymous_pull):
                raise Unauthorized("log in to pull from this registry", headers=CHALLENGE)
            return
        if self.config.read_only:
            raise Unsupported("this registry is read-only (access.read_only = true)")
        if self.users is None:
            if not (self.config.anonymous_push or is_loopback(request.remote)):
                raise Denied(f"pushes and deletes are taken only from this host; {PUSH_FIX}")
            return
        if user is None:
            raise Unauthorized("log in to push to this registry", headers=CHALLENGE)
        if self.config.push_users and user not in self.config.push_users:
            raise Denied(f"user {user} may not push here (access.push_users)")

    def middleware(self):
        """The aiohttp middleware that applies this policy to every request."""
        open_pulls = self.users is None  # without logins a pull needs no check at all

        @web.middleware
        async def authorize(request: web.Request, handler):
            if not (open_pulls and request.method in PULL_METHODS):
                await self.authorize(request)
            return await handler(request)
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
