"""One `Upstream` per configured registry: auth, redirects, bounded concurrency, error mapping.

Every request to an upstream goes through `Upstream.open`, which
- asks `auth.Authenticator` for a token up front and retries once on a 401 with a fresh one;
- follows redirects by hand (Docker Hub and GHCR send blobs to a CDN with 307) keeping the
  Location byte-exact and dropping the upstream's Authorization on any other origin;
- never decompresses (`Accept-Encoding: identity`): bytes are hashed exactly as sent;
- waits for a slot under the global and the per-upstream limit of in-flight requests, and
  holds new requests while a 429's Retry-After runs, instead of hammering a rate limit;
- turns every failure into a RegistryError: 404 → the caller's *_UNKNOWN, 401/403 → DENIED,
  429 → TOOMANYREQUESTS with Retry-After, 5xx / connection errors / timeouts → UNAVAILABLE.
No aiohttp exception escapes this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .. import config as cfg
from .. import metrics
from ..errors import BlobUnknown, BodyBroken, Denied, RegistryError, TooManyRequests, Unavailable
from ..storage.memory import Memory
from .auth import Authenticator, parse_challenges

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
    upstream: str = ""  # its name, for the metrics

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_chunked(BODY_CHUNK):
                metrics.UPSTREAM_BYTES.inc(len(chunk), self.upstream)
                yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            metrics.UPSTREAM_ERRORS.inc(1, self.upstream)
            raise BodyBroken(f"upstream body broke off: {e.__class__.__name__} {e}") from e


@dataclass
class Answer:
    """A small upstream answer read whole (manifests, tag lists, referrers)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class Upstream:
    def __init__(self, config: cfg.Upstream, limits: cfg.Limits, session: aiohttp.ClientSession,
                 memory: Memory, global_slots: asyncio.Semaphore):
        self.config = config
        self.name = config.name
        self.base = URL(config.url.rstrip("/"))
        self.session = session
        self._global = global_slots
        self._slots = asyncio.Semaphore(limits.upstream_requests_per_upstream)
        self._small = aiohttp.ClientTimeout(total=limits.request_timeout,
                                            connect=limits.connect_timeout)
        # A body gets no total limit: only a watchdog on progress between reads.
        self._stream = aiohttp.ClientTimeout(total=None, connect=limits.connect_timeout,
                                             sock_connect=limits.connect_timeout,
                                             sock_read=limits.stall_timeout)
        self.auth = Authenticator(config, session, memory, self._small)
        self.paused_until = 0.0
        self.last_error: str | None = None
        self.last_ok: float | None = None  # wall-clock time of the last successful answer

    @asynccontextmanager
    async def open(self, method: str, path: str, *, name: str, not_found: type[RegistryError],
                   accept: list[str] = (), stream: bool = False, headers: dict | None = None
                   ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request for repository `name`; yield the successful response."""
        # Per-upstream slot first: a busy upstream must not sit on global slots others need.
        async with self._slots, self._global:
            if (pause := self.paused_until - time.monotonic()) > 0:
                log.info("upstream %s asked to slow down; waiting %.1fs", self.name, pause)
                await asyncio.sleep(pause)
            metrics.upstream_request(self.name, name, path)
            try:
                resp = await self._send(method, path, name, accept, stream, headers or {})
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                metrics.UPSTREAM_ERRORS.inc(1, self.name)
                self.last_error = f"{e.__class__.__name__} {e}"
                raise Unavailable(f"upstream {self.name} is unreachable: {self.last_error}") from e
            try:
                self._check(resp, name, not_found)
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
                metrics.UPSTREAM_ERRORS.inc(1, self.name)
                raise Unavailable(f"upstream {self.name} broke off: {e}") from e
            metrics.UPSTREAM_BYTES.inc(len(body), self.name)
            return Answer(r.status, r.headers, bytes(body))

    @asynccontextmanager
    async def blob(self, name: str, digest: str, start: int = 0) -> AsyncIterator[Body]:
        """Stream a blob; from byte `start` on when the upstream honours a Range."""
        headers = {"Range": f"bytes={start}-"} if start else {}
        async with self.open("GET", f"/v2/{name}/blobs/{digest}", name=name,
                             not_found=BlobUnknown, stream=True, headers=headers) as resp:
            if resp.status == 206:
                first, total = _content_range(resp.headers.get("Content-Range", ""))
                yield Body(first, total, resp, self.name)
            else:
                yield Body(0, resp.content_length, resp, self.name)

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
        resp = await self._follow(method, url, headers, timeout)
        if resp.status == 401:
            challenges = parse_challenges(resp.headers.getall("WWW-Authenticate", []))
            resp.release()
            authorization = await self.auth.answer(challenges, scope,
                                                   headers.get("Authorization"))
            if authorization is None:
                return resp
            headers["Authorization"] = authorization
            resp = await self._follow(method, url, headers, timeout)
        return resp

    async def _follow(self, method: str, url: URL, headers: CIMultiDict,
                      timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self.session.request(method, url, headers=headers, timeout=timeout,
                                              allow_redirects=False)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECTS or location is None:
                return resp
            resp.release()
            # Byte-exact: a CDN's signed URL breaks if its query is re-quoted.
            url = url.join(URL(location, encoded=True))
            if url.origin() != self.base.origin() and "Authorization" in headers:
                headers = headers.copy()
                del headers["Authorization"]
            if resp.status == 303:
                method = "GET"
        raise Unavailable(f"upstream {self.name} redirected more than {MAX_REDIRECTS} times")

    def _check(self, resp: aiohttp.ClientResponse, name: str,
               not_found: type[RegistryError]) -> None:
        status = resp.status
        if status < 300:
            self.last_error, self.last_ok = None, time.time()
            return
        if status == 404:
            raise not_found(f"{name} is not known to upstream {self.name}")
        if status in (401, 403):
            raise Denied(f"upstream {self.name} refused access to {name}; if it is private, "
                         f"set username and password for upstream {self.name}")
        if status == 429:
            retry_after = resp.headers.get("Retry-After", "")
            delay = float(retry_after) if retry_after.isdigit() else 1.0
            self.paused_until = time.monotonic() + min(delay, 300.0)
            self.last_error = "429 Too Many Requests"
            metrics.UPSTREAM_RATE_LIMITED.inc(1, self.name)
            metrics.UPSTREAM_ERRORS.inc(1, self.name)
            raise TooManyRequests(f"upstream {self.name} is rate limiting this mirror",
                                  headers={"Retry-After": retry_after or "1"})
        self.last_error = f"HTTP {status}"
        metrics.UPSTREAM_ERRORS.inc(1, self.name)
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
