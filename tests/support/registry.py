"""A real CNCF Distribution registry (Debian's `docker-registry`) as a child process.

It owns one `docker-registry` process: its YAML config, filesystem storage and log file,
all in the directory it is given, its port on 127.0.0.1, and its life. Token auth points
at a `TokenServer`, so the registry answers exactly as a Bearer-protected registry such
as Docker Hub does (401 + `WWW-Authenticate: Bearer realm=...,service=...,scope=...`).
`stop()` kills only the PID this object started.
"""

from __future__ import annotations

import atexit
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import stop_process
from .tokens import TokenServer

CONFIG = """\
version: 0.1
log:
  level: info
  formatter: text
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  # No blob-descriptor cache: tests delete and re-push, and must see the disk as it is.
http:
  addr: 127.0.0.1:{port}
  headers:
    X-Content-Type-Options: [nosniff]
auth:
  token:
    realm: {realm}
    service: {service}
    issuer: {issuer}
    rootcertbundle: {certs}
"""


def free_port() -> int:
    """A port nobody listens on right now. (Racy by nature: start() retries on a clash.)"""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Registry:
    def __init__(self, directory: Path, tokens: TokenServer,
                 binary: str = "/usr/bin/docker-registry") -> None:
        self.directory = Path(directory)
        self.tokens = tokens
        self.binary = binary
        self.storage = self.directory / "storage"
        # The token server grants pull only on repositories that exist here (as Docker Hub).
        tokens.repositories = self.storage / "docker/registry/v2/repositories"
        self.config_path = self.directory / "config.yml"
        self.log_path = self.directory / "registry.log"
        self.port = 0
        self.url = ""
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15) -> "Registry":
        self.storage.mkdir(parents=True, exist_ok=True)
        # Belt and braces: even if the session's finalizer never runs (a crash in fixture
        # setup, ^C), the interpreter's exit still kills our child.
        atexit.register(self.stop)
        # The port is picked before the registry binds it; if someone else takes it in
        # between, the registry exits at once and we try another.
        for _attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.config_path.write_text(CONFIG.format(
                storage=self.storage, port=self.port, realm=self.tokens.realm,
                service=self.tokens.service, issuer=self.tokens.issuer,
                certs=self.tokens.cert_path))
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [self.binary, "serve", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self.pid = self._proc.pid
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"docker-registry did not start; see {self.log_path}:\n"
                           + self.log_path.read_text()[-2000:])

    def _wait_ready(self, timeout: float) -> bool:
        """Poll `GET /v2/` until it answers; with token auth on, 401 means ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False  # exited: bad config or port taken
            try:
                urllib.request.urlopen(f"{self.url}/v2/", timeout=1).close()
                return True
            except urllib.error.HTTPError as err:
                if err.code == 401:
                    return True
            except OSError:
                pass  # not listening yet
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, grace=5)

    def log(self) -> str:
        """The registry's log so far, for failure messages."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
