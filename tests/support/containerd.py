"""A private containerd for client tests, the `hosts.toml` it reads, and a mirror that logs.

`Containerd` owns one `containerd` process (Debian's package) with its root, state, socket
and config in the directory it is given, so it never touches a system containerd: only the
content, metadata, snapshot (`native`, which needs no mount privileges) and image plugins
matter for `ctr images pull`; CRI, tracing and the exotic snapshotters are disabled so it
starts the same way on a laptop and in an unprivileged CI container. Content is isolated
per namespace, so a pull into a fresh namespace is a new node with an empty store. `ctr()`
runs one `ctr` command against it with a time limit. `stop()` kills only the PID it started.

`write_hosts()` writes `<hosts dir>/<registry>/hosts.toml` in the format containerd reads
from `/etc/containerd/certs.d` (and `ctr --hosts-dir`): hosts are tried in file order,
then `server`. `logged_app()` builds the mirror like the `start_mirror` fixture but keeps a
log of every request it answered, so tests can see what the client sent to it; serve it with
pytest-aiohttp's `aiohttp_server` (conftest's `logged_mirror` does).
"""

from __future__ import annotations

import asyncio
import atexit
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from mirror import config as cfg
from mirror.app import make_app

from . import stop_process

CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.monitor.v1.cgroups"]
  no_prometheus = true

# Each namespace sees only the content pulled into it: a pull in a fresh namespace is a
# new node that downloads every blob, instead of borrowing another namespace's copy.
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"""


@dataclass
class Ctr:
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Ctr:
        assert self.returncode == 0, f"ctr failed ({self.returncode}):\n{self.stderr[-3000:]}"
        return self


class Containerd:
    def __init__(self, directory: Path, binary: str = "containerd") -> None:
        self.directory = Path(directory)
        self.binary = binary
        self.socket = self.directory / "containerd.sock"
        if len(str(self.socket)) > 90:
            # A unix socket path has at most 107 bytes, and ttrpc's adds ".ttrpc".
            self.socket = Path(tempfile.mkdtemp(prefix="ctrd-")) / "c.sock"
        self.config_path = self.directory / "config.toml"
        self.log_path = self.directory / "containerd.log"
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> Containerd:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(CONFIG.format(
            root=self.directory / "root", state=self.directory / "state", socket=self.socket))
        atexit.register(self.stop)  # even if the fixture's finalizer never runs
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            # The socket appears before every service is registered: ask for the version.
            if self.socket.exists() and subprocess.run(
                    ["ctr", "--address", str(self.socket), "version"], capture_output=True,
                    timeout=10, check=False).returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"containerd did not start; {self.log_path}:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, grace=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def ctr(self, namespace: str, *args: str, timeout: float = 60) -> Ctr:
        """`ctr --namespace NS ARGS...` against this daemon; killed (by PID) past `timeout`."""
        proc = await asyncio.create_subprocess_exec(
            "ctr", "--address", str(self.socket), "--namespace", namespace, *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"ctr {' '.join(args)} took more than {timeout}s") from None
        return Ctr(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))

    async def pull(self, namespace: str, reference: str, hosts_dir: Path,
                   platform: str = "linux/amd64", timeout: float = 60) -> Ctr:
        """`ctr images pull` (unpacked with the native snapshotter) through `hosts_dir`."""
        return await self.ctr(namespace, "images", "pull", "--hosts-dir", str(hosts_dir),
                              "--snapshotter", "native", "--platform", platform, reference,
                              timeout=timeout)

    async def image_digest(self, namespace: str, reference: str) -> str:
        """The digest containerd recorded as the image's target (`ctr images ls`)."""
        listing = (await self.ctr(namespace, "images", "ls")).check().stdout
        for line in listing.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == reference:
                return fields[2]
        raise AssertionError(f"{reference} not in `ctr images ls`:\n{listing}")

    async def content(self, namespace: str, digest: str) -> bytes:
        """The bytes of one blob from containerd's content store (`ctr content get`)."""
        proc = await asyncio.create_subprocess_exec(
            "ctr", "--address", str(self.socket), "--namespace", namespace, "content", "get",
            digest, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, f"ctr content get {digest}: {err.decode()}"
        return out


def write_hosts(hosts_dir: Path, registry: str, server: str,
                hosts: list[tuple[str, str]]) -> Path:
    """`hosts_dir/<registry>/hosts.toml`: `server`, then each (url, extra TOML) host in order.

    The extra TOML goes inside the host's table, e.g. `ca = "/etc/mirror/ca.crt"`.
    """
    lines = [f'server = "{server}"', ""]
    for url, extra in hosts:
        lines += [f'[host."{url}"]', '  capabilities = ["pull", "resolve"]']
        lines += [f"  {line}" for line in extra.splitlines() if line.strip()]
        lines.append("")
    path = Path(hosts_dir) / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


@dataclass
class Seen:
    """One request the mirror answered, as the client sent it."""
    method: str
    path: str          # raw path and query
    status: int
    accept: list[str]  # every Accept header line


def logged_app(config: cfg.Config) -> tuple[web.Application, list[Seen]]:
    """The mirror app, and the log of what it answered.

    The log is filled from `on_response_prepare`, which sees every response the mirror
    sends, errors included; nothing of the mirror itself is replaced.
    """
    app = make_app(config)
    seen: list[Seen] = []

    async def note(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(Seen(request.method, request.raw_path, response.status,
                         request.headers.getall("Accept", [])))

    app.on_response_prepare.append(note)
    return app, seen
