"""The limits on upstream traffic: request slots and body permits, each waited for with a deadline.

Two things are limited, separately, because they last very differently:

- a *request slot* (per upstream, `limits.upstream_requests_per_upstream`, and over all
  upstreams, `limits.upstream_requests`) covers connecting, sending and waiting for the
  response headers — milliseconds for a manifest, a tag check or a token;
- a *body permit* (over all upstreams, `limits.upstream_bodies`) covers streaming one blob
  body, which may take minutes for a 5 GB layer.

So a manifest request never waits behind layer downloads: at worst it waits for another
request's headers. Waiting has a deadline (`limits.slot_timeout`, one budget for the whole
admission of a request); past it the request fails with 503 and `Retry-After`, because a
mirror that hangs is the harmful kind (Docker falls back to Docker Hub on an error, but
waits on a hang). A 429 pause is sat out before anything is taken, never while holding.
"""

from __future__ import annotations

import asyncio
import math
import time

from .. import config as cfg
from ..errors import Unavailable


class Shared:
    """The limits every upstream shares: global request slots and body permits."""

    def __init__(self, limits: cfg.Limits) -> None:
        self.requests = asyncio.Semaphore(limits.upstream_requests)
        self.bodies = asyncio.Semaphore(limits.upstream_bodies)
        self.timeout = limits.slot_timeout


class Held:
    """Semaphores taken for one request, released at most once each."""

    def __init__(self) -> None:
        self._held: list[asyncio.Semaphore] = []

    def add(self, semaphore: asyncio.Semaphore) -> None:
        self._held.append(semaphore)

    def release(self) -> None:
        while self._held:
            self._held.pop().release()


async def take(semaphore: asyncio.Semaphore, deadline: float, what: str,
               timeout: float) -> None:
    """Acquire `semaphore` by `deadline` (time.monotonic()) or raise Unavailable (503)."""
    if not semaphore.locked():
        await semaphore.acquire()  # free: returns at once, whatever the deadline
        return
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            raise TimeoutError
        # wait_for hands back the permit if it was granted just as the time ran out.
        await asyncio.wait_for(semaphore.acquire(), remaining)
    except TimeoutError:
        raise Unavailable(f"{what} stayed busy for {timeout:g}s (limits.slot_timeout); "
                          "try again shortly", headers={"Retry-After": retry_after(timeout)}
                          ) from None


def retry_after(seconds: float) -> str:
    """A Retry-After value in whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
