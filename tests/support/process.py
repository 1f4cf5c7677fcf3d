"""`mirror serve` as a real child process, and a client that checks what it serves.

`MirrorProcess` owns one server process at a time on a storage root it is given: it writes
a TOML config (listen on a free 127.0.0.1 port, the root, the upstreams, any other keys),
starts `python -m mirror serve --config F` with its output in a log file next to the
config, waits for `/healthz`, and ends it by its PID only — `kill()` is SIGKILL, the crash
the tests are about; `stop()` is SIGTERM. `start()` again runs a new process on the same
root, as an operator's restart after a crash does. `cli()` runs another `mirror` command
(`gc`, `verify`, `ls`) on the same config while the server runs. `rss()` and `fds()` read
/proc/PID.

The client half is what a test asserts with after a restart: `pull()` fetches a manifest
and every blob it reaches (through an index, too) and checks each one's digest and size,
so an image counts as pullable only when it is byte-exact; `push()` writes an image as a
client does (blobs monolithic or in chunks, then the manifest under its tags).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp

from . import stop_process

REPO = Path(__file__).resolve().parents[2]

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[:2]


def free_port() -> int:
    """A port nobody listens on right now (racy by nature: start() retries on a clash)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def toml(settings: dict[str, Any]) -> str:
    """Just enough TOML for a mirror config: tables of scalars and lists, and arrays of
    tables (a list of dicts, as `upstreams`)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML for {v!r}")

    lines: list[str] = []
    for section, body in settings.items():
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines += [f"{key} = {value(v)}" for key, v in table.items()]
    return "\n".join(lines) + "\n"


@dataclass
class MirrorProcess:
    """One `mirror serve` at a time on `root`; `directory` holds its config and logs."""

    root: Path
    directory: Path
    upstream_url: str | None = None
    # Extra config, by section: {"storage": {"max_size": 1 << 20}, "server": {...}}.
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    tag_ttl: float = 3600.0
    proc: subprocess.Popen | None = None
    port: int = 0
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def config_path(self) -> Path:
        return self.directory / "mirror.toml"

    @property
    def log_path(self) -> Path:
        return self.directory / "mirror.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- life ----------------------------------------------------------------------------

    def write_config(self, port: int, **settings: dict[str, Any]) -> Path:
        sections: dict[str, Any] = {"server": {"listen": f"127.0.0.1:{port}",
                                               "access_log": False},
                                    "storage": {"root": str(self.root)}}
        for layer in (self.settings, settings):  # this start's keys win, key by key
            for section, values in layer.items():
                sections.setdefault(section, {}).update(values)
        sections["server"]["listen"] = f"127.0.0.1:{port}"
        if self.upstream_url is not None:
            sections["upstreams"] = [
                {"name": "docker.io", "url": self.upstream_url, "default": True,
                 "aliases": ["hub"], "tag_ttl": self.tag_ttl},
            ]
        else:  # offline-only tests must never reach the real Docker Hub
            sections["upstreams"] = [{"name": "docker.io", "url": "http://127.0.0.1:9",
                                      "default": True}]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(toml(sections))
        return self.config_path

    def start(self, timeout: float = 20.0, **settings: dict[str, Any]) -> MirrorProcess:
        """Start a server on the root; `settings` override the config for this start only."""
        assert not self.running(), "already running"
        for attempt in range(3):
            self.port = free_port()
            self.write_config(self.port, **settings)
            self.starts += 1
            with open(self.log_path, "ab") as log:
                log.write(f"--- start {self.starts} on port {self.port}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "mirror", "serve", "--config", str(self.config_path)],
                    cwd=REPO, env=_environment(), stdout=log, stderr=subprocess.STDOUT)
            try:
                self._wait_healthy(timeout)
                return self
            except _PortTaken:
                self.kill()
        raise RuntimeError(f"mirror did not start after 3 tries; see {self.log_path}")

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if "address already in use" in tail.lower():
                    raise _PortTaken()
                raise RuntimeError(f"mirror exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mirror gave no /healthz within {timeout}s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL to this PID: no cleanup runs, as when the kernel or an operator kills it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to this PID (a clean shutdown), SIGKILL after `grace` seconds."""
        stop_process(self.proc, grace)

    def restart(self, **settings: dict[str, Any]) -> MirrorProcess:
        self.kill()
        return self.start(**settings)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- looking at it -------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """`mirror --config <this config> ARGS...` in its own process, beside the server."""
        return subprocess.run([sys.executable, "-m", "mirror", "--config",
                               str(self.config_path), *args], check=False, cwd=REPO,
                              env=_environment(), capture_output=True, text=True,
                              timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rss(self) -> int:
        """Resident memory of the server, in bytes (VmRSS of /proc/PID/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def fds(self) -> int:
        """File descriptors the server holds open."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))


class _PortTaken(Exception):
    pass


def _environment() -> dict[str, str]:
    # No MIRROR_* of the caller's may change the config under test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def tree(root: Path, folder: str) -> tuple[int, int]:
    """(files, bytes) under root/folder, counted from the disk."""
    files = size = 0
    base = Path(root) / folder
    if not base.exists():
        return 0, 0
    for path in base.rglob("*"):
        try:
            if path.is_file():
                files += 1
                size += path.stat().st_size
        except FileNotFoundError:
            pass  # removed while we walked: the server is running
    return files, size


def blob_files(root: Path) -> dict[str, Path]:
    """digest -> file of every committed blob under root/blobs/<algorithm>/<xx>/<hex>."""
    found: dict[str, Path] = {}
    base = Path(root) / "blobs"
    if base.exists():
        for algorithm in base.iterdir():
            for path in algorithm.glob("*/*"):
                if path.is_file():
                    found[f"{algorithm.name}:{path.name}"] = path
    return found


def misnamed_blobs(root: Path) -> list[str]:
    """Blob files whose bytes do not hash to their name: what a torn write would leave."""
    bad = []
    for digest, path in blob_files(root).items():
        try:
            if sha256(path.read_bytes()) != digest:
                bad.append(digest)
        except FileNotFoundError:
            pass
    return bad


# -- a client that checks every byte ------------------------------------------------------


class PullError(Exception):
    def __init__(self, status: int, what: str, body: bytes = b"") -> None:
        super().__init__(f"{what}: {status} {body[:300]!r}")
        self.status = status
        self.what = what
        self.body = body

    @property
    def code(self) -> str:
        try:
            return json.loads(self.body)["errors"][0]["code"]
        except (ValueError, KeyError, IndexError, TypeError):
            return ""


@dataclass
class Pulled:
    digest: str
    manifest: bytes
    blobs: dict[str, bytes]           # every blob reached, by digest, verified
    manifests: dict[str, bytes]       # every manifest reached (the index's children too)


async def get_manifest(session: aiohttp.ClientSession, base: str, name: str,
                       reference: str) -> tuple[str, str, bytes]:
    """(digest, media type, bytes) of a manifest, the digest checked against the bytes."""
    async with session.get(f"{base}/v2/{name}/manifests/{reference}",
                           headers=[("Accept", t) for t in MANIFEST_TYPES]) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise PullError(resp.status, f"manifest {name}:{reference}", body)
        digest = sha256(body)
        header = resp.headers.get("Docker-Content-Digest")
        if header != digest:
            raise PullError(resp.status, f"manifest {name}:{reference} has digest {digest} "
                                         f"but Docker-Content-Digest {header}", body)
        if reference.startswith("sha256:") and reference != digest:
            raise PullError(resp.status, f"manifest {name}@{reference} answered with bytes "
                                         f"of digest {digest}", body)
        return digest, resp.headers.get("Content-Type", ""), body


async def get_blob(session: aiohttp.ClientSession, base: str, name: str, digest: str,
                   size: int | None = None) -> bytes:
    """A blob's bytes, which must hash to `digest` (and be `size` long when given)."""
    async with session.get(f"{base}/v2/{name}/blobs/{digest}") as resp:
        if resp.status != 200:
            raise PullError(resp.status, f"blob {name}@{digest}", await resp.read())
        try:
            body = await resp.read()
        except aiohttp.ClientPayloadError as e:
            # Content-Length was promised and the body ended short: a failed fill says so.
            raise PullError(-1, f"blob {name}@{digest} ended short: {e}") from e
    if sha256(body) != digest or (size is not None and len(body) != size):
        raise PullError(200, f"blob {name}@{digest} answered {len(body)} bytes of digest "
                             f"{sha256(body)} (expected size {size})")
    return body


async def pull(session: aiohttp.ClientSession, base: str, name: str,
               reference: str) -> Pulled:
    """A whole image: the manifest, every child of an index, every config and layer."""
    digest, media_type, body = await get_manifest(session, base, name, reference)
    pulled = Pulled(digest, body, {}, {digest: body})
    document = json.loads(body)
    if document.get("mediaType", media_type) in INDEX_TYPES or "manifests" in document:
        for child in document.get("manifests", []):
            sub = await pull(session, base, name, child["digest"])
            pulled.blobs.update(sub.blobs)
            pulled.manifests.update(sub.manifests)
        return pulled
    for descriptor in [document["config"], *document.get("layers", [])]:
        pulled.blobs[descriptor["digest"]] = await get_blob(
            session, base, name, descriptor["digest"], descriptor.get("size"))
    return pulled


async def push_blob(session: aiohttp.ClientSession, base: str, name: str, data: bytes,
                    chunk: int | None = None) -> str:
    """Upload one blob: monolithic (POST ?digest=) or, with `chunk`, POST + PATCHes + PUT."""
    digest = sha256(data)
    if chunk is None:
        async with session.post(f"{base}/v2/{name}/blobs/uploads/?digest={digest}",
                                data=data) as resp:
            if resp.status != 201:
                raise PullError(resp.status, f"push blob {name}@{digest}", await resp.read())
        return digest
    async with session.post(f"{base}/v2/{name}/blobs/uploads/") as resp:
        if resp.status != 202:
            raise PullError(resp.status, f"start upload {name}", await resp.read())
        location = resp.headers["Location"]
    for start in range(0, len(data), chunk):
        piece = data[start:start + chunk]
        async with session.patch(absolute(base, location), data=piece, headers={
                "Content-Range": f"{start}-{start + len(piece) - 1}",
                "Content-Type": "application/octet-stream"}) as resp:
            if resp.status != 202:
                raise PullError(resp.status, f"PATCH {name} at {start}", await resp.read())
            location = resp.headers["Location"]
    async with session.put(with_digest(absolute(base, location), digest)) as resp:
        if resp.status != 201:
            raise PullError(resp.status, f"finish upload {name}@{digest}", await resp.read())
    return digest


async def push_manifest(session: aiohttp.ClientSession, base: str, name: str,
                        reference: str, manifest: bytes, media_type: str) -> str:
    async with session.put(f"{base}/v2/{name}/manifests/{reference}", data=manifest,
                           headers={"Content-Type": media_type}) as resp:
        if resp.status != 201:
            raise PullError(resp.status, f"push manifest {name}:{reference}", await resp.read())
        return resp.headers.get("Docker-Content-Digest", "")


async def push(session: aiohttp.ClientSession, base: str, image: Any,
               chunk: int | None = None) -> None:
    """Push a tests.support.images.Image under its own name and tags (children first)."""
    for child in image.children:
        await push(session, base, child, chunk)
    for data in image.blobs.values():
        await push_blob(session, base, image.name, data, chunk)
    for reference in image.tags or [image.digest]:
        await push_manifest(session, base, image.name, reference, image.manifest,
                            image.media_type)


def absolute(base: str, location: str) -> str:
    return location if location.startswith("http") else base + location


def with_digest(url: str, digest: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}digest={digest}"


async def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    """Poll `predicate` (a plain function) until it is true or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())
