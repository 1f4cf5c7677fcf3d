"""One background thread running one asyncio event loop, for servers that outlive a test.

pytest-asyncio gives every test its own event loop and closes it afterwards, so a
session-scoped aiohttp server cannot live on a test's loop: it would die with the first
test. `ServerThread` owns a private loop in a daemon thread instead; the token server and
the fault proxy both run on it. The test thread talks to it only through `call()` (run a
coroutine there and wait for its result) and `call_soon()` (poke the loop without
waiting), so tests never have to await anything to control the servers.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any, Awaitable, Callable, TypeVar

from aiohttp import web

T = TypeVar("T")


class ServerThread:
    def __init__(self, name: str = "test-servers") -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Cleanups registered by the servers (e.g. runner.cleanup), run on the loop at stop().
        self._cleanups: list[Callable[[], Awaitable[Any]]] = []

    def start(self) -> "ServerThread":
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()
            # run_forever returned: stop() has already run the cleanups; close what is left.
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

        # daemon=True: if a test run is killed hard, this thread must not keep Python alive.
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("server thread did not start")
        return self

    def call(self, coro: Awaitable[T], timeout: float = 30) -> T:
        """Run `coro` on the server loop and block the calling thread until it finishes."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("call() from the server thread itself would deadlock")
        assert self.loop is not None, "ServerThread not started"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a plain function on the server loop (thread-safe, does not wait)."""
        assert self.loop is not None, "ServerThread not started"
        self.loop.call_soon_threadsafe(fn, *args)

    def on_stop(self, cleanup: Callable[[], Awaitable[Any]]) -> None:
        """Register an async cleanup; stop() runs them newest first, like a finalizer stack."""
        self._cleanups.append(cleanup)

    def serve(self, app: web.Application, **runner_kwargs: Any) -> int:
        """Serve `app` on 127.0.0.1 at a free port, on this loop; returns the port."""

        async def start() -> int:
            runner = web.AppRunner(app, access_log=None, **runner_kwargs)
            await runner.setup()
            # Bind the socket ourselves (port 0 = the kernel picks a free one) so the port is
            # known without reaching into the site's private server object.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            await web.SockSite(runner, sock).start()
            self.on_stop(runner.cleanup)
            return sock.getsockname()[1]

        return self.call(start())

    def stop(self) -> None:
        if self.loop is None or self._thread is None or not self._thread.is_alive():
            return

        async def cleanup_all() -> None:
            for cleanup in reversed(self._cleanups):
                try:
                    await cleanup()
                except Exception:  # keep going: one broken server must not leak the others
                    pass
            self._cleanups.clear()
            # Cancel whatever handlers are still running (e.g. a stalled proxy response).
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            if others:
                await asyncio.wait(others, timeout=5)

        try:
            self.call(cleanup_all(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
