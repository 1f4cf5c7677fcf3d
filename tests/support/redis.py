"""A real redis-server (Debian's `redis-server`) as a child process, and its pytest fixtures.

`RedisServer` owns one process at a time on 127.0.0.1, a free port and a directory of its
own. By default it keeps nothing (`--save '' --appendonly no`), as a Redis configured
without persistence does, so a restart loses every key; `appendonly=True` makes it fsync
every write to its append-only file, so a restart keeps them. `start()` again runs a new
process on the same port and directory (a restart); `stop()` is SIGTERM, `kill()` is
SIGKILL, and both signal only the PID this object started.

Fixtures (load with `pytest_plugins = ["tests.support.redis"]`): `redis_server`, one server
per session; `redis_url_prefix`, that server's URL with a key prefix of the test's own, so
tests share the server without seeing each other's keys; `start_redis`, servers of the
test's own (to restart or stop), each stopped when the test ends.
"""

from __future__ import annotations

import atexit
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import stop_process
from .registry import free_port


class RedisServer:
    def __init__(self, directory: Path, appendonly: bool = False,
                 binary: str = "/usr/bin/redis-server") -> None:
        self.directory = Path(directory)
        self.appendonly = appendonly
        self.binary = binary
        self.log_path = self.directory / "redis.log"
        self.port = 0
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 10) -> RedisServer:
        """Start it; the first time on a free port, afterwards on the same port and dir."""
        self.directory.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)  # even if the session's finalizer never runs
        first = self.port == 0
        # A port picked free can be taken before redis binds it: a first start tries
        # another; a restart must keep its port (the clients under test know it).
        for _attempt in range(3 if first else 1):
            if first:
                self.port = free_port()
            persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly
                           else ["--appendonly", "no"])
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", *persistence, "--dir", str(self.directory)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            if self._wait_ready(timeout):
                return self
            self.kill()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within "
                           f"{timeout}s; its output:\n{self.log()[-3000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False  # exited: port taken, bad arguments
            if self.ping():
                return True
            time.sleep(0.05)
        return False

    def ping(self) -> bool:
        """Whether something answers PING on the port (RESP over a plain socket)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to our PID, SIGKILL if it has not exited after 10 s."""
        proc, self._proc = self._proc, None
        stop_process(proc, grace=10)

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.start()
    finally:  # runs on failure too: the process is ended by its PID
        server.stop()


@pytest.fixture
def redis_url_prefix(redis_server: RedisServer) -> tuple[str, str]:
    """(URL, key prefix): the session's server, and keys no other test uses."""
    return redis_server.url, f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    servers: list[RedisServer] = []

    def start(appendonly: bool = False) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", appendonly)
        servers.append(server)
        return server.start()
    yield start
    for server in servers:
        server.stop()
