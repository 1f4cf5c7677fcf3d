"""Fixtures: a real upstream (session-wide, tests/support) and mirrors started against it.

`mirror` starts the application on a real 127.0.0.1 socket in the test's event loop, with
two upstreams that both lead to the test registry through the counting, fault-injecting
proxy: `docker.io` (the default, aliases `hub`) and `quay.io` (alias `quay`), so routing by
default, `ns` and prefix can all be observed. `start_mirror` makes more (restarts, other TTLs).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import hypothesis
import pytest
from aiohttp.test_utils import TestServer

from mirror import config as cfg
from mirror.app import make_app, ssl_context
from mirror.keys import PROXY
from tests.support.containerd import Containerd, logged_app

pytest_plugins = ["tests.support.fixtures", "tests.support.redis", "tests.support.seaweed",
                  "tests.support.cluster"]

# In CI (CI=true) the property tests draw the same examples every run: a case found there
# for the first time would fail a landing by chance. Local runs keep exploring, and so does
# bench/fuzz.py; what either finds becomes an explicit @example.
hypothesis.settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")


@dataclass
class Mirror:
    url: str
    host: str  # host:port, as clients write it in image references
    config: cfg.Config
    server: TestServer

    @property
    def root(self) -> Path:
        return Path(self.config.storage.root)

    @property
    def proxy(self):
        """The running mirror's cache policy object, to observe fills in flight."""
        return self.server.app[PROXY]

    def blob_files(self) -> list[Path]:
        return [p for p in (self.root / "blobs").rglob("*") if p.is_file()]


def mirror_config(root: Path, upstream_url: str, **overrides) -> cfg.Config:
    ttl = overrides.pop("tag_ttl", 300.0)
    limits = cfg.Limits(**overrides.pop("limits", {}))
    upstreams = overrides.pop("upstreams", (
        cfg.Upstream("docker.io", upstream_url, default=True, aliases=("hub",), tag_ttl=ttl),
        cfg.Upstream("quay.io", upstream_url, aliases=("quay",), tag_ttl=ttl),
    ))
    server = overrides.pop("server", cfg.Server(listen="127.0.0.1:0"))
    storage = cfg.Storage(root=str(root), **overrides.pop("storage", {}))
    return cfg.Config(server=server, storage=storage, limits=limits, upstreams=upstreams,
                      **overrides)


@pytest.fixture
async def start_mirror(tmp_path, upstream, aiohttp_server):
    """Start mirrors on 127.0.0.1 (HTTPS when the config has a certificate); pytest-aiohttp's
    `aiohttp_server` closes them after the test, also those a test closed itself."""

    async def start(root: Path | None = None, url: str | None = None, **overrides) -> Mirror:
        config = mirror_config(root or tmp_path / "data", url or upstream.url, **overrides)
        tls = ssl_context(config)
        server = await aiohttp_server(make_app(config), ssl=tls)
        host = f"127.0.0.1:{server.port}"
        return Mirror(f"{'https' if tls else 'http'}://{host}", host, config, server)

    return start


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    """A private containerd (tests/support/containerd.py), one per test module."""
    daemon = Containerd(tmp_path_factory.mktemp("containerd")).start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
async def logged_mirror(tmp_path, upstream, aiohttp_server):
    """Start mirrors that log what they answer (tests/support/containerd.py's `logged_app`):
    (host:port, the log, the data root). Keyword arguments are mirror_config's overrides;
    None leaves its default."""
    roots: list[Path] = []

    async def start(**overrides):
        overrides = {key: value for key, value in overrides.items() if value is not None}
        root = tmp_path / f"data{len(roots)}"
        roots.append(root)
        app, seen = logged_app(mirror_config(root, upstream.url, **overrides))
        server = await aiohttp_server(app)
        return f"127.0.0.1:{server.port}", seen, root

    return start


@pytest.fixture
async def mirror(start_mirror) -> Mirror:
    return await start_mirror()


@pytest.fixture
def big(upstream):
    """The ~3 MiB incompressible alpine layer, and its bytes."""
    alpine = upstream.images["library/alpine"]
    digest = max(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    return digest, alpine.blobs[digest]


@pytest.fixture
async def http():
    """One client session for every server of a test, by absolute URL as real clients ask.

    Not pytest-aiohttp's `aiohttp_client`: its TestClient is bound to one server and takes
    only paths, while a test here talks to several (the mirror, the upstream, a token realm,
    mirrors started mid-test) by absolute URL. Bodies stay compressed as sent
    (auto_decompress=False), so tests see the bytes on the wire.
    """
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def skopeo_copy(reference: str, dest: Path, *extra: str, arch: str | None = None) -> dict:
    """skopeo copy docker://reference dir:dest; returns what it wrote, by digest."""
    global_args = ["--override-arch", arch] if arch else []
    proc = await asyncio.create_subprocess_exec(
        "skopeo", *global_args, "copy", "--src-tls-verify=false", "--retry-times=0", *extra,
        f"docker://{reference}", f"dir:{dest}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"skopeo failed: {err.decode()}"
    manifest = (dest / "manifest.json").read_bytes()
    files = {sha256(p.read_bytes()): p.read_bytes() for p in dest.iterdir()
             if len(p.name) == 64}
    return {"manifest": manifest, "digest": sha256(manifest), "blobs": files,
            "parsed": json.loads(manifest)}


def fetched(upstream, method: str | None = None, contains: str | None = None) -> int:
    """Upstream requests that were answered with content, not with an auth challenge (401)."""
    return sum(1 for r in upstream.proxy.records if r.status != 401
               and (method is None or r.method == method)
               and (contains is None or contains in r.path))
