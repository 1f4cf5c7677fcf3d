"""A private Docker engine for the engine tests, and the loopback proxy its fallback dials.

`Dockerd` owns one `dockerd` process (Debian's `docker.io`, 20.10) started as PROTOCOL.md
says: no iptables, no bridge, the vfs storage driver, and its data root, exec root, socket,
pidfile, daemon.json and log in one short directory under /tmp (a unix socket path has at
most 107 bytes, and containerd's ttrpc socket adds to the one dockerd makes for it).
The daemon.json it writes is the caller's plus `deprecated-key-path` in that directory,
or dockerd would write its identity key to /etc/docker/key.json; the one thing it still
makes outside is the empty /run/docker/plugins, which `stop()` removes again if it made it.
`configure()` rewrites daemon.json and sends SIGHUP: dockerd reloads `registry-mirrors`
and `insecure-registries` in place, so one daemon serves a whole test module. `docker()`
runs the 20.10 client against the socket with `DOCKER_CONFIG` in that directory, so a
`docker login` never touches ~/.docker. `stop()` ends the PID it started (TERM, KILL after
a grace), then the containerd dockerd spawned (its child, whose PID it wrote down), undoes
the bind mount dockerd puts on its data root if a killed daemon left it, and removes the
directory.

No request may leave the machine, yet Docker falls back from a mirror to
registry-1.docker.io on almost any error. So dockerd gets `HTTPS_PROXY`/`HTTP_PROXY`
pointing at a `RecordingProxy` on 127.0.0.1 and `NO_PROXY=127.0.0.1,localhost` (Go never
proxies loopback anyway): a fallback becomes a `CONNECT registry-1.docker.io:443` line in
`proxy.requests`, answered 502 as a proxy that cannot reach the host answers.

`trusted_ca()` puts a CA where dockerd looks for a registry's CA,
`/etc/docker/certs.d/<host:port>/ca.crt`, and removes it afterwards.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import shutil
import signal
import socketserver
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import stop_process

# Debian's docker.io ships the client that matches its daemon as /usr/bin/docker; another
# client earlier on PATH (a newer static build) would negotiate a different API version.
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")
DOCKERD = shutil.which("dockerd", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
CTR = shutil.which("ctr")  # Debian's containerd, which docker.io depends on
CERTS_D = Path("/etc/docker/certs.d")
RUN_DIR = Path("/run/docker")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")


class DockerdError(RuntimeError):
    """dockerd did not start, or did not take a new daemon.json; the message has its log."""


def unavailable() -> str | None:
    """Why the engine tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "dockerd runs as root only, and these tests start their own"
    if DOCKERD is None or DOCKER is None or CTR is None:
        return ("dockerd, the docker client or ctr is not installed "
                "(Debian packages docker.io and containerd; scripts/test.sh installs them)")
    return None


class RecordingProxy:
    """An HTTP forward proxy on 127.0.0.1 that records each request line and forwards none.

    Every request (a `CONNECT host:443` for https, an absolute URL for http) is answered
    `502 Bad Gateway`, what a proxy with no route to the host answers.
    """

    def __init__(self) -> None:
        self.requests: list[str] = []
        records = self.requests

        class Handler(socketserver.StreamRequestHandler):
            timeout = 10

            def handle(self) -> None:
                try:
                    line = self.rfile.readline(8192).decode("latin-1").rstrip("\r\n")
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # the rest of the head: nothing in it changes the answer
                except OSError:
                    return
                records.append(line)
                body = b"recording proxy: no request leaves this machine\n"
                self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (len(body), body))

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="docker-proxy",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> RecordingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def connects(self) -> list[str]:
        """The hosts Docker tried to tunnel to, `host:port`, in order."""
        return [r.split()[1] for r in self.requests if r.startswith("CONNECT ")]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    raw: bytes = b""  # stdout as bytes (`docker save` writes a tar there)

    def check(self) -> Result:
        assert self.returncode == 0, f"docker failed ({self.returncode}):\n{self.stderr[-3000:]}"
        return self


class Dockerd:
    def __init__(self, proxy_url: str) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="dockerd-", dir="/tmp"))
        self.socket = self.directory / "sock"
        self.config_path = self.directory / "daemon.json"
        self.log_path = self.directory / "dockerd.log"
        self.client_config = self.directory / "client"  # DOCKER_CONFIG: logins land here
        self.proxy_url = proxy_url
        self.started_in: float | None = None  # seconds from exec to a `docker version` answer
        self._proc: subprocess.Popen | None = None
        self._containerd: int | None = None
        self._made_run_dir = False

    # -- life ----------------------------------------------------------------------------

    def start(self, daemon_json: str = "{}", timeout: float = 30) -> Dockerd:
        self._write_config(daemon_json)
        self.client_config.mkdir(exist_ok=True)
        atexit.register(self.stop)  # even if the fixture's finalizer never runs
        self._made_run_dir = not RUN_DIR.exists()
        env = {k: v for k, v in os.environ.items() if k.upper() not in PROXY_VARIABLES}
        env.update(HTTPS_PROXY=self.proxy_url, HTTP_PROXY=self.proxy_url,
                   NO_PROXY="127.0.0.1,localhost")
        d = self.directory
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [DOCKERD, "--iptables=false", "--ip6tables=false", "--bridge=none",
                 "--storage-driver=vfs", f"--data-root={d / 'root'}",
                 f"--exec-root={d / 'exec'}", f"-H=unix://{self.socket}",
                 f"--pidfile={d / 'pid'}", f"--config-file={self.config_path}"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = began + timeout
        while time.monotonic() < deadline and self._proc.poll() is None:
            # The socket exists before the API answers: ask for the server's version.
            if self.socket.exists() and self._run("version", "--format",
                                                  "{{.Server.Version}}").returncode == 0:
                self.started_in = time.monotonic() - began
                self._containerd = self._read_containerd_pid()
                return self
            time.sleep(0.1)
        self.stop()
        raise DockerdError(f"dockerd did not start; {self.log_path}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, grace=20)
            if self._containerd is not None:
                _end_orphan(self._containerd, str(self.directory))
        for mount in reversed(_mounts_under(self.directory)):
            # dockerd bind-mounts its data root onto itself and undoes it on TERM; after a
            # KILL the mount stays, and removing the tree under it would not end it.
            subprocess.run(["umount", mount], check=False, capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._made_run_dir:
            # dockerd makes /run/docker/plugins (plugin discovery, not configurable); it is
            # empty here, and rmdir leaves it if another daemon has put something in it.
            for directory in (RUN_DIR / "plugins", RUN_DIR):
                try:
                    directory.rmdir()
                except OSError:
                    break

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def leftovers(self) -> list[str]:
        """Processes and mounts of this daemon still present (`pgrep -a`-style lines)."""
        mine = str(self.directory)
        found = [f"{pid} {cmd}" for pid, cmd in _processes() if mine in cmd]
        return found + [f"mount {m}" for m in _mounts_under(self.directory)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- configuration -------------------------------------------------------------------

    def configure(self, daemon_json: str, timeout: float = 15) -> None:
        """Write daemon.json and have dockerd reload it (SIGHUP); returns once `docker info`
        shows the new mirrors and insecure registries."""
        settings = self._write_config(daemon_json)
        assert self._proc is not None, "not started"
        # Docker stores each mirror with one trailing slash (registry.ValidateMirror).
        mirrors = [m.rstrip("/") + "/" for m in settings.get("registry-mirrors", [])]
        insecure = set(settings.get("insecure-registries", []))
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.registry_config()
            indexes = {name for name, index in (info.get("IndexConfigs") or {}).items()
                       if not index.get("Secure")}
            if (info.get("Mirrors") or []) == mirrors and insecure <= indexes:
                return
            time.sleep(0.1)
        raise DockerdError(f"dockerd did not reload {self.config_path} ({daemon_json}); "
                           f"it reports {self.registry_config()}; log:\n{self.log()[-2000:]}")

    def _write_config(self, daemon_json: str) -> dict:
        settings = json.loads(daemon_json)
        # dockerd would otherwise write its identity key to /etc/docker/key.json.
        settings["deprecated-key-path"] = str(self.directory / "key.json")
        self.config_path.write_text(json.dumps(settings, indent=2))
        return settings

    def registry_config(self) -> dict:
        """`docker info`'s RegistryConfig: Mirrors, IndexConfigs, InsecureRegistryCIDRs."""
        result = self._run("info", "--format", "{{json .RegistryConfig}}")
        return json.loads(result.stdout) if result.returncode == 0 else {}

    # -- the client ----------------------------------------------------------------------

    def environ(self) -> dict[str, str]:
        """The client's environment: this daemon, this config dir, nothing of the caller's."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("DOCKER_") and k.upper() not in PROXY_VARIABLES}
        env.update(DOCKER_HOST=f"unix://{self.socket}", DOCKER_CONFIG=str(self.client_config))
        return env

    def _run(self, *args: str) -> Result:
        done = subprocess.run([DOCKER, *args], env=self.environ(), capture_output=True,
                              text=True, timeout=30, check=False)
        return Result(done.returncode, done.stdout, done.stderr)

    async def docker(self, *args: str, stdin: bytes | None = None,
                     timeout: float = 120) -> Result:
        """One `docker ARGS...` run; killed (by PID) past `timeout`. The event loop keeps
        running meanwhile, so a mirror served from the test's loop answers it."""
        proc = await asyncio.create_subprocess_exec(
            DOCKER, *args, env=self.environ(),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"docker {' '.join(args)} took more than {timeout} s") from None
        return Result(proc.returncode or 0, out.decode(errors="replace"),
                      err.decode(errors="replace"), out)

    async def inspect(self, reference: str) -> dict:
        """`docker image inspect` of one image: Id, RepoTags, RepoDigests, RootFS, Os, ..."""
        result = (await self.docker("image", "inspect", reference)).check()
        return json.loads(result.stdout)[0]

    async def reset(self) -> None:
        """No images, no cached manifests and no logins: the next test starts from an
        empty engine."""
        listed = (await self.docker("image", "ls", "--all", "--quiet", "--no-trunc")).check()
        ids = sorted(set(listed.stdout.split()))
        if ids:
            (await self.docker("image", "rm", "--force", *ids)).check()
        # dockerd 20.10 also keeps each manifest it pulled in its containerd's content
        # store (namespace moby) and reads it from there when a tag's HEAD names a digest
        # it holds, so the next pull would skip the manifest GET. `rmi` only drops the
        # lease; containerd's garbage collector removes the blob some time later (later
        # still on a loaded machine), so it is removed here, not left to that race.
        cached = (await self.ctr("content", "ls", "--quiet")).check().stdout.split()
        if cached:
            (await self.ctr("content", "rm", *cached)).check()
        (self.client_config / "config.json").unlink(missing_ok=True)

    async def ctr(self, *args: str) -> Result:
        """`ctr ARGS...` against the containerd this dockerd started, in its namespace."""
        proc = await asyncio.create_subprocess_exec(
            CTR, "--address", str(self.directory / "exec" / "containerd" / "containerd.sock"),
            "--namespace", "moby", *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        return Result(proc.returncode or 0, out.decode(errors="replace"),
                      err.decode(errors="replace"), out)

    # -- internals -----------------------------------------------------------------------

    def _read_containerd_pid(self) -> int | None:
        path = self.directory / "exec" / "containerd" / "containerd.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None


@contextmanager
def trusted_ca(host: str, ca: Path) -> Iterator[Path]:
    """`/etc/docker/certs.d/<host>/ca.crt` holding `ca` for the block (dockerd reads the
    directory at each registry lookup: no reload needed); removed afterwards, and certs.d
    with it if this made it."""
    made_root = not CERTS_D.exists()
    directory = CERTS_D / host
    directory.mkdir(parents=True)  # a unique port: a directory already there is not ours
    try:
        (directory / "ca.crt").write_bytes(Path(ca).read_bytes())
        yield directory / "ca.crt"
    finally:
        shutil.rmtree(directory)
        if made_root and not any(CERTS_D.iterdir()):
            CERTS_D.rmdir()


def _processes() -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if cmd and state != "Z":
                found.append((int(entry.name), cmd))
    return found


def _end_orphan(pid: int, marker: str, grace: float = 10) -> None:
    """TERM, then KILL, a process that is not our child (so it cannot be waited for), but
    only while its command line still names `marker`: a reused PID is left alone."""
    def alive() -> bool:
        return any(p == pid and marker in cmd for p, cmd in _processes())

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive():
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and alive():
            time.sleep(0.05)


def _mounts_under(directory: Path) -> list[str]:
    prefix = str(directory)
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]
