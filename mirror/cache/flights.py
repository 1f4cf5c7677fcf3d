"""Flights: at most one in-flight call per key; every caller with that key awaits its result.

Tag revalidations, manifest fetches and token requests go through one `Flights` each, so a
fleet asking for the same thing at once costs the upstream one request. The shared call
runs in its own task: a caller that gives up (its client disconnected) cancels only its own
wait, never the work the others are waiting for.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Hashable


class Flights:
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._running)

    def __contains__(self, key: Hashable) -> bool:
        """Whether a call for `key` is running (joining it costs nothing new)."""
        return key in self._running

    async def run(self, key: Hashable, call: Callable[[], Awaitable[Any]]) -> Any:
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(call())
            self._running[key] = future
            future.add_done_callback(lambda f: self._forget(key, f))
        # shield: a waiter's cancellation must not cancel the shared call.
        return await asyncio.shield(future)

    def _forget(self, key: Hashable, future: asyncio.Future) -> None:
        if self._running.get(key) is future:
            del self._running[key]
        if not future.cancelled():
            future.exception()  # retrieved here, so an unawaited failure is not logged twice
