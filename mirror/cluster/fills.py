"""FillLeases: one upstream fetch per digest for the whole cluster.

    <cluster>:fill:<digest>   {"replica", "url"} of the replica fetching it (PX LEASE_SECONDS,
                              renewed every LEASE_SECONDS/3 while its fill runs)

The replica whose client misses a blob first takes the digest's lease (SET NX) and fills
from the upstream exactly as one node does (cache/fill.py); it releases the lease once the
fill ended, by then committed to the bucket. Any other replica that misses the same digest
meanwhile follows the holder: its own fill reads the holder's spool through
`/_mirror/fills/<digest>` (api/peers.py), from byte 0 at once, so its clients get each
byte as soon as the holder has it, and the last byte only after the holder checked the
digest (then the follower checks it again). Late joiners and ranges are the follower's
own fill's business, as on one node.

Takeover: when the holder dies (its stream breaks) or stalls, the follower's fill goes on
from its next source, a `takeover`: it waits for the dead holder's lease to lapse, takes
it, and asks the upstream for the rest with `Range: bytes=<what it relayed>-` — or, if
another replica took the lease first, follows that one from there. Clients of the dead
holder end short, as on a cut; clients of the others go on.

Fail open: when Redis does not answer, a replica fills on its own (the digest still
guarantees the bytes), logs it once per outage and counts it; it tries Redis again only
after RETRY_SECONDS, so an unreachable Redis never adds its timeout to each miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp
from redis import exceptions as redis_errors

from ..errors import BlobUnknown, BodyBroken, Unavailable
from ..metrics import Metrics
from . import peers
from .lease import Lease

log = logging.getLogger("mirror")

LEASE_SECONDS = 10.0
RETRY_SECONDS = 5.0
CHUNK = 1 << 20
# A replica waits this long at most for another's tag or manifest fetch, looking this often.
FLIGHT_SECONDS = 30.0
FLIGHT_POLL = 0.05

T = TypeVar("T")


@dataclass
class Holding:
    """This replica holds the digest's lease; `release()` when its fill ended."""

    lease: Lease
    heartbeat: asyncio.Task

    async def release(self) -> None:
        self.heartbeat.cancel()
        await self.lease.release()


@dataclass
class Following:
    """Another replica holds it: stream from `url`."""

    replica: str
    url: str


class Alone:
    """Redis did not answer: fill without a lease."""


Claim = Holding | Following | Alone


class FillLeases:
    def __init__(self, redis: Any, prefix: str, replica: str, url: str, secret: str,
                 session: aiohttp.ClientSession, stall_timeout: float = 30.0,
                 metrics: Metrics | None = None):
        self.redis = redis
        # The application's; shared_fill counts the cluster's fills in it too.
        self.metrics = metrics if metrics is not None else Metrics()
        self.prefix = prefix
        self.replica = replica
        self.url = url.rstrip("/")
        self.secret = secret
        self.session = session
        self.stall_timeout = stall_timeout
        self._value = json.dumps({"replica": replica, "url": self.url})
        self._retry_at = 0.0
        self._down = False

    def _lease(self, digest: str) -> Lease:
        return Lease(self.redis, f"{self.prefix}fill:{digest}", self._value, LEASE_SECONDS)

    async def claim(self, digest: str) -> Claim:
        """Take the digest's lease, or say who holds it; Alone when Redis is unreachable."""
        if time.monotonic() < self._retry_at:
            return self._alone()
        lease = self._lease(digest)
        try:
            if await lease.take():
                self._up()
                return Holding(lease, asyncio.ensure_future(self._beat(lease)))
            value = await self.redis.get(lease.key)
        except (redis_errors.RedisError, OSError) as e:
            return self._failed(e)
        self._up()
        if value is None:  # released between the two calls: try once more
            return await self.claim(digest)
        try:
            holder = json.loads(value)
            return Following(str(holder["replica"]), str(holder["url"]))
        except (ValueError, KeyError, TypeError):
            return self._alone()

    async def _beat(self, lease: Lease) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            if not await lease.renew():
                log.warning("lost the fill lease %s; another replica may fetch it too",
                            lease.key)
                return

    async def once(self, key: str, run: Callable[[], Awaitable[T]],
                   stored: Callable[[], Awaitable[T | None]]) -> T:
        """`run()` on one replica of the cluster at a time for `key` (a tag's revalidation,
        a manifest's fetch); a replica that finds another running it waits for it to end
        and takes `stored()`, what that run left in the shared metadata. Without Redis, or
        when nothing was stored (the other run failed), it runs itself."""
        deadline = time.monotonic() + FLIGHT_SECONDS
        claim = await self.claim(f"flight:{key}")
        if isinstance(claim, Alone):
            return await run()
        if isinstance(claim, Holding):
            try:
                # The caller found nothing stored before it claimed; another replica's
                # run may have stored it and released the lease in between, and running
                # again would be a second upstream fetch.
                found = await stored()
                return found if found is not None else await run()
            finally:
                await claim.release()
        key = f"{self.prefix}fill:flight:{key}"
        try:
            while await self.redis.exists(key) and time.monotonic() < deadline:
                await asyncio.sleep(FLIGHT_POLL)
        except (redis_errors.RedisError, OSError) as e:
            self._failed(e)
        found = await stored()
        return found if found is not None else await run()

    def _alone(self) -> Alone:
        self.metrics.cluster_lease_failures.inc()
        return Alone()

    def _failed(self, error: Exception) -> Alone:
        self._retry_at = time.monotonic() + RETRY_SECONDS
        if not self._down:
            self._down = True
            log.warning("fill leases are unavailable (Redis: %s); each replica fetches new "
                        "blobs on its own until Redis answers", error)
        return self._alone()

    def _up(self) -> None:
        if self._down:
            self._down = False
            log.info("fill leases work again: one upstream fetch per blob for the cluster")

    @contextlib.asynccontextmanager
    async def stream(self, url: str, digest: str, start: int) -> AsyncIterator[PeerBody]:
        """The holder's bytes of `digest` from `start`, as a fill's Body."""
        path = f"{peers.PATH}{digest}"
        headers = {peers.HEADER: peers.sign(self.secret, self.replica, path)}
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            response = await self.session.get(
                url + path, headers=headers, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5,
                                              sock_read=self.stall_timeout))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise BodyBroken(f"replica {url} does not answer for {digest}: {e}") from None
        try:
            if response.status == 404:
                raise BlobUnknown(f"replica {url} no longer fills {digest}")
            if response.status not in (200, 206):
                raise Unavailable(f"replica {url} answered {response.status} for {digest}")
            yield PeerBody(response, start)
        finally:
            response.release()


class PeerBody:
    """A holder's answer, as fill.py's Body: `start`, `size`, `chunks()`."""

    def __init__(self, response: aiohttp.ClientResponse, asked: int):
        self._response = response
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        length = response.headers.get("Content-Length", "")
        if response.status == 206:
            self.start = asked
            self.size = int(total) if total.isdigit() else None
        else:
            self.start = 0
            self.size = int(length) if length.isdigit() else None

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise BodyBroken(f"the holder's stream broke off: {e}") from None
