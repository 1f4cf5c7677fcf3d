"""One `Upstream` per configured registry: auth, redirects, bounded concurrency, error mapping.

Every request to an upstream goes through `Upstream.open`, which
- asks `auth.Authenticator` for a token up front and retries once on a 401 with a fresh one;
  only a 401 from the upstream's own origin is answered (a CDN's own 401 teaches nothing);
- follows redirects by hand (Docker Hub and GHCR send blobs to a CDN with 307) keeping the
  Location byte-exact, dropping the Authorization on any other origin, and going only where
  `destinations.Destinations` allows (http/https, no private or metadata addresses);
- never decompresses (`Accept-Encoding: identity`): bytes are hashed exactly as sent;
- holds a request slot (`slots.py`) only while connecting and waiting for the headers; a
  blob body holds a body permit instead, so manifests never queue behind layers; waiting
  for either has a deadline (503 with Retry-After), and a 429's Retry-After is sat out
  before anything is taken (or answered at once with 429, when it is too long to wait);
- turns every failure into a RegistryError: 404 → the caller's *_UNKNOWN (worded from what
  the upstream said: missing.py), 401/403 → DENIED, 429 → TOOMANYREQUESTS with Retry-After,
  5xx / connection errors / timeouts → UNAVAILABLE.
No aiohttp exception escapes this module.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .. import config as cfg
from ..errors import BlobUnknown, BodyBroken, Denied, RegistryError, TooManyRequests, Unavailable
from ..metrics import Metrics, UpstreamCounts
from ..storage.memory import Memory
from .auth import Authenticator, parse_challenges
from .destinations import Destinations, same_origin
from .missing import error_code, refused, unknown
from .raw_body import RawBody, detach
from .slots import Held, Shared, retry_after, take

log = logging.getLogger("mirror")

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
BODY_CHUNK = 1 << 20
USER_AGENT = "mirror/0.1 (pull-through registry cache)"


@dataclass
class Body:
    """A streaming upstream blob body, as fill.Fill reads it."""

    start: int
    size: int | None
    response: aiohttp.ClientResponse
    counts: UpstreamCounts  # its upstream's series
    stall_timeout: float  # limits.stall_timeout: the longest wait for a byte

    def detach(self) -> RawBody | None:
        """The rest of the body to read on a thread, when it is plain HTTP (raw_body.py)."""
        return detach(self.response, self.counts, self.stall_timeout)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_chunked(BODY_CHUNK):
                self.counts.bytes.inc(len(chunk))
                yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            self.counts.errors.inc()
            raise BodyBroken(f"upstream body broke off: {e.__class__.__name__} {e}") from e


@dataclass
class Answer:
    """A small upstream answer read whole (manifests, tag lists, referrers)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class Upstream:
    def __init__(self, config: cfg.Upstream, limits: cfg.Limits, session: aiohttp.ClientSession,
                 memory: Memory, shared: Shared, metrics: Metrics | None = None):
        self.config = config
        self.name = config.name
        # Counted where nobody reads when none is given (an upstream built alone, in a test).
        self.metrics = metrics if metrics is not None else Metrics()
        self.counts = self.metrics.upstream(self.name)
        self.base = URL(config.url.rstrip("/"))
        self.session = session
        self._shared = shared
        self._slots = asyncio.Semaphore(limits.upstream_requests_per_upstream)
        self._small = aiohttp.ClientTimeout(total=limits.request_timeout,
                                            connect=limits.connect_timeout)
        # A body gets no total limit: only a watchdog on progress between reads.
        self._stall_timeout = limits.stall_timeout
        self._stream = aiohttp.ClientTimeout(total=None, connect=limits.connect_timeout,
                                             sock_connect=limits.connect_timeout,
                                             sock_read=limits.stall_timeout)
        self.destinations = Destinations(self.name, self.base)
        self.auth = Authenticator(config, session, memory, self._small, self.destinations)
        # A 429's pause is also written to the memory tier, which replicas share (Redis):
        # an upstream that asked one replica to slow down is left alone by all of them.
        self.memory = memory
        self.paused_until = 0.0
        self.last_error: str | None = None
        self.last_ok: float | None = None  # wall-clock time of the last successful answer

    @asynccontextmanager
    async def open(self, method: str, path: str, *, name: str, not_found: type[RegistryError],
                   accept: list[str] = (), stream: bool = False, headers: dict | None = None
                   ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request for repository `name`; yield the successful response."""
        async with self._open(method, path, name, not_found, accept, stream, headers or {},
                              self._deadline(), Held()) as resp:
            yield resp

    @asynccontextmanager
    async def _open(self, method: str, path: str, name: str, not_found: type[RegistryError],
                    accept: list[str], stream: bool, headers: dict, deadline: float,
                    held: Held) -> AsyncIterator[aiohttp.ClientResponse]:
        await self._admit(held, deadline)
        try:
            self.metrics.upstream_request(self.name, name, path)
            try:
                resp = await self._send(method, path, name, accept, stream, headers)
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                self.counts.errors.inc()
                self.last_error = f"{e.__class__.__name__} {e}"
                raise Unavailable(f"upstream {self.name} is unreachable: {self.last_error}") from e
        finally:
            held.release()  # the headers are here (or never will be): the slot is free
        try:
            try:
                said = await error_code(resp) if resp.status == 404 else None
                self._check(resp, name, not_found, path, said)
            except TooManyRequests:
                # Told to every replica (the memory tier is theirs too), awaited here since
                # _check is not a coroutine.
                await self.memory.set(self._pause_key, time.time() + self._pause_left(),
                                      ttl=max(self._pause_left(), 1.0))
                raise
            yield resp
        finally:
            resp.release()

    async def fetch(self, method: str, path: str, *, name: str, not_found: type[RegistryError],
                    accept: list[str] = (), limit: int = 4 << 20) -> Answer:
        """A whole small answer; bodies over `limit` bytes are refused (manifests: 4 MiB)."""
        async with self.open(method, path, name=name, not_found=not_found, accept=accept) as r:
            body = bytearray()
            try:
                async for chunk in r.content.iter_any():
                    body += chunk
                    if len(body) > limit:
                        raise Unavailable(
                            f"upstream {self.name} sent more than {limit} bytes for {path}")
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                self.counts.errors.inc()
                raise Unavailable(f"upstream {self.name} broke off: {e}") from e
            self.counts.bytes.inc(len(body))
            return Answer(r.status, r.headers, bytes(body))

    @asynccontextmanager
    async def blob(self, name: str, digest: str, start: int = 0) -> AsyncIterator[Body]:
        """Stream a blob; from byte `start` on when the upstream honours a Range.

        The body permit is taken first and kept until the body is read: a blob waiting for
        a permit must not sit on a request slot that manifests need meanwhile.
        """
        headers = {"Range": f"bytes={start}-"} if start else {}
        deadline = self._deadline()
        while True:  # a 429 pause is sat out holding nothing, not even a body permit
            await self._sit_out_pause(deadline)
            await take(self._shared.bodies, deadline, "every upstream body permit "
                       "(limits.upstream_bodies)", self._shared.timeout)
            if self.paused_until <= time.monotonic():
                break
            self._shared.bodies.release()
        try:
            async with self._open("GET", f"/v2/{name}/blobs/{digest}", name, BlobUnknown,
                                  [], True, headers, deadline, Held()) as resp:
                if resp.status == 206:
                    first, total = _content_range(resp.headers.get("Content-Range", ""))
                    yield Body(first, total, resp, self.counts, self._stall_timeout)
                else:
                    yield Body(0, resp.content_length, resp, self.counts, self._stall_timeout)
        finally:
            self._shared.bodies.release()

    @property
    def _pause_key(self) -> str:
        return f"pause:{self.name}"

    def _pause_left(self) -> float:
        return max(self.paused_until - time.monotonic(), 0.0)

    def _deadline(self) -> float:
        return time.monotonic() + self._shared.timeout

    async def _admit(self, held: Held, deadline: float) -> None:
        """Take this upstream's request slot, then a global one, after any 429 pause.

        Per-upstream first: a busy upstream must not sit on global slots others need. If a
        429 arrived while we waited, give both back and sit out the pause holding nothing.
        """
        timeout = self._shared.timeout
        while True:
            await self._sit_out_pause(deadline)
            await take(self._slots, deadline, f"every request slot for upstream {self.name} "
                       "(limits.upstream_requests_per_upstream)", timeout)
            held.add(self._slots)
            try:
                await take(self._shared.requests, deadline, "every upstream request slot "
                           "(limits.upstream_requests)", timeout)
            except BaseException:
                held.release()
                raise
            held.add(self._shared.requests)
            if self.paused_until <= time.monotonic():
                return
            held.release()

    async def _sit_out_pause(self, deadline: float) -> None:
        """Wait for a 429's Retry-After to run out; 429 at once if it outlasts the deadline."""
        until = await self.memory.get(self._pause_key)  # wall-clock: another replica's 429
        if isinstance(until, (int, float)):
            self.paused_until = max(self.paused_until, time.monotonic() + until - time.time())
        while (pause := self.paused_until - time.monotonic()) > 0:
            if time.monotonic() + pause > deadline:
                raise TooManyRequests(
                    f"upstream {self.name} is rate limiting this mirror for {pause:.0f}s more",
                    headers={"Retry-After": retry_after(pause)})
            log.info("upstream %s asked to slow down; waiting %.1fs", self.name, pause)
            await asyncio.sleep(pause)

    async def _send(self, method: str, path: str, name: str, accept: list[str],
                    stream: bool, extra: dict[str, str]) -> aiohttp.ClientResponse:
        scope = f"repository:{name}:pull"
        headers = CIMultiDict([("Accept", a) for a in accept])
        headers.update(extra)
        headers["Accept-Encoding"] = "identity"
        headers["User-Agent"] = USER_AGENT
        if authorization := await self.auth.header(scope):
            headers["Authorization"] = authorization
        url = URL(str(self.base) + path, encoded=True)
        timeout = self._stream if stream else self._small
        resp, where = await self._follow(method, url, headers, timeout)
        # Only the upstream's own 401 is a challenge; a CDN's is that CDN's business, and
        # learning its realm would send the upstream's tokens (or credentials) there.
        if resp.status == 401 and self._home(where):
            challenges = parse_challenges(resp.headers.getall("WWW-Authenticate", []))
            resp.release()
            authorization = await self.auth.answer(challenges, scope,
                                                   headers.get("Authorization"))
            if authorization is None:
                return resp
            headers["Authorization"] = authorization
            resp, where = await self._follow(method, url, headers, timeout)
        if resp.status in (401, 403) and not self._home(where):
            resp.release()
            raise Unavailable(f"upstream {self.name} redirected {path} to "
                              f"{where.scheme}://{where.host}, which refused it with "
                              f"{resp.status}")
        return resp

    def _home(self, url: URL) -> bool:
        """Whether `url` is on the upstream's own origin: scheme, host and port."""
        return same_origin(url, self.base)

    async def _follow(self, method: str, url: URL, headers: CIMultiDict,
                      timeout: aiohttp.ClientTimeout) -> tuple[aiohttp.ClientResponse, URL]:
        """The response at the end of the redirects, and the URL that answered it."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self._request(method, url, headers, timeout)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECTS or location is None:
                return resp, url
            resp.release()
            try:
                # Byte-exact: a CDN's signed URL breaks if its query is re-quoted.
                url = url.join(URL(location, encoded=True))
            except ValueError:
                raise Unavailable(f"upstream {self.name} sent an unreadable redirect "
                                  f"Location") from None
            if not self._home(url) and "Authorization" in headers:
                headers = headers.copy()
                del headers["Authorization"]
            if resp.status == 303:
                method = "GET"
        raise Unavailable(f"upstream {self.name} redirected more than {MAX_REDIRECTS} times")

    async def _request(self, method: str, url: URL, headers: CIMultiDict,
                       timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """One request to a destination the policy checked, trying its addresses in turn."""
        targets = await self.destinations.targets(url)
        for i, target in enumerate(targets):
            sent = headers
            if target.host is not None:
                sent = headers.copy()
                sent["Host"] = target.host
            try:
                return await self.session.request(method, target.url, headers=sent,
                                                  timeout=timeout, allow_redirects=False,
                                                  **target.request_options())
            except aiohttp.ClientConnectorError:
                if i + 1 == len(targets):
                    raise
        raise AssertionError("targets() returns at least one target")

    def _check(self, resp: aiohttp.ClientResponse, name: str,
               not_found: type[RegistryError], path: str = "", said: str | None = None) -> None:
        status = resp.status
        if status < 300:
            self.last_error, self.last_ok = None, time.time()
            return
        if status == 404:
            raise not_found(unknown(self.name, name, path, said))
        if status in (401, 403):
            raise Denied(refused(self.name, name, self.config.username))
        if status == 429:
            value = resp.headers.get("Retry-After", "")
            delay = retry_delay(value)
            self.paused_until = time.monotonic() + min(delay, 300.0)
            self.last_error = "429 Too Many Requests"
            self.counts.rate_limited.inc()
            self.counts.errors.inc()
            raise TooManyRequests(f"upstream {self.name} is rate limiting this mirror",
                                  headers={"Retry-After": retry_after(max(delay, 1.0))})
        if status in REDIRECTS:
            raise Unavailable(f"upstream {self.name} answered {status} for {name} "
                              "without a Location")
        self.last_error = f"HTTP {status}"
        self.counts.errors.inc()
        raise Unavailable(f"upstream {self.name} answered {status} for {name}")


def _content_range(value: str) -> tuple[int, int | None]:
    """(first byte, total size) of `Content-Range: bytes FIRST-LAST/TOTAL`."""
    try:
        _, _, spec = value.partition(" ")
        span, _, total = spec.partition("/")
        first = int(span.partition("-")[0])
        return first, (int(total) if total.isdigit() else None)
    except ValueError:
        raise Unavailable(f"upstream sent an unreadable Content-Range: {value[:100]!r}") from None


def retry_delay(value: str, now=time.time) -> float:
    """Seconds a `Retry-After` asks for: delay-seconds or an HTTP-date (RFC 9110 10.2.3);
    1 s when it is missing or unreadable."""
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 1.0
    return max(when.timestamp() - now(), 0.0) if when.tzinfo is not None else 1.0
