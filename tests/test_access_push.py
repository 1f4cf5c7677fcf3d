"""Who may push and delete without logins: this host (loopback) only, unless
`access.anonymous_push = true`; a mirror on 0.0.0.0 is not writable from the network.

Other hosts are played by requests whose transport reports a TEST-NET-1 peer (192.0.2.7):
nothing is ever sent to that address."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from aiohttp import web

from mirror import config as cfg
from mirror.api.access import Access
from mirror.app import make_app
from mirror.errors import Denied, Unsupported
from tests.conftest import mirror_config
from tests.test_access_logins import mocked

DIGEST = "sha256:" + "a" * 64
WRITES = [("POST", "/v2/library/alpine/blobs/uploads/"),
          ("PATCH", "/v2/library/alpine/blobs/uploads/some-upload"),
          ("PUT", "/v2/library/alpine/manifests/latest"),
          ("DELETE", "/v2/library/alpine/manifests/latest"),
          ("DELETE", f"/v2/team/app/blobs/{DIGEST}"),
          ("PUT", "/hub/v2/library/alpine/manifests/latest")]


async def passes(access: Access, request) -> bool:
    """Whether the access middleware hands `request` on to the handler."""
    handled = []

    async def handler(request):
        handled.append(request)
        return web.Response()

    await access.middleware()(request, handler)
    return handled == [request]


@pytest.mark.parametrize("method, path", WRITES)
async def test_pushes_and_deletes_from_another_host_are_denied_naming_the_fix(method, path):
    access = Access(cfg.Access())
    with pytest.raises(Denied) as denied:
        await passes(access, mocked(method, path, remote="192.0.2.7"))
    response = denied.value.response()
    assert response.status == 403
    error = json.loads(response.body)["errors"][0]
    assert error["code"] == "DENIED"
    assert "`mirror user add NAME`" in error["message"] and "access.htpasswd" in error["message"]
    assert "access.anonymous_push = true" in error["message"]


async def test_pulls_from_another_host_pass_and_anonymous_push_lets_writes_through():
    closed = Access(cfg.Access())
    for method in ("GET", "HEAD"):
        assert await passes(closed, mocked(method, "/v2/library/alpine/manifests/latest"))
    opened = Access(cfg.Access(anonymous_push=True))
    for method, path in WRITES:
        assert await passes(opened, mocked(method, path, remote="192.0.2.7"))
    read_only = Access(cfg.Access(anonymous_push=True, read_only=True))
    with pytest.raises(Unsupported):
        await passes(read_only, mocked("PUT", "/v2/x/manifests/t", remote="127.0.0.1"))


@pytest.mark.parametrize("remote, allowed", [
    ("127.0.0.1", True), ("127.45.6.7", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("192.0.2.7", False), ("::ffff:192.0.2.7", False), ("2001:db8::7", False),
    ("10.0.0.1", False), ("0.0.0.0", False), (None, False)])
async def test_only_loopback_clients_may_push_without_logins(remote, allowed):
    access = Access(cfg.Access())
    request = mocked("POST", "/v2/team/new/blobs/uploads/", remote=remote)
    if allowed:
        assert await passes(access, request)
    else:
        with pytest.raises(Denied):
            await passes(access, request)


@pytest.fixture
async def mirror_seen_from(tmp_path, upstream, aiohttp_server):
    """A mirror from make_app on 127.0.0.1 whose requests look as if they came from `remote`
    (what a reverse proxy's middleware does); nothing of the mirror is replaced."""
    roots: list[Path] = []

    async def start(remote: str | None, **overrides):
        root = tmp_path / f"data{len(roots)}"
        roots.append(root)
        app = make_app(mirror_config(root, upstream.url, **overrides))
        if remote is not None:
            @web.middleware
            async def seen_from(request, handler):
                return await handler(request.clone(remote=remote))
            app.middlewares.insert(0, seen_from)
        server = await aiohttp_server(app)
        return f"http://127.0.0.1:{server.port}", root

    return start


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push(http, url: str, name: str, tag: str) -> tuple[int, bytes, bytes]:
    """Push a one-layer image; (status of the manifest PUT, manifest, layer)."""
    config, layer = b'{"architecture": "amd64", "os": "linux"}', b"layer bytes " * 100
    for blob in (config, layer):
        async with http.post(f"{url}/v2/{name}/blobs/uploads/?digest={digest_of(blob)}",
                             data=blob) as resp:
            if resp.status != 201:
                return resp.status, b"", b""
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest_of(layer), "size": len(layer)}]}).encode()
    async with http.put(f"{url}/v2/{name}/manifests/{tag}", data=manifest, headers={
            "Content-Type": "application/vnd.oci.image.manifest.v1+json"}) as resp:
        return resp.status, manifest, layer


async def test_a_real_push_over_loopback_is_stored_and_pulls_back(mirror_seen_from, http):
    url, root = await mirror_seen_from(None)  # the test's own connection: 127.0.0.1
    status, manifest, layer = await push(http, url, "team/new", "1.0")
    assert status == 201
    async with http.get(f"{url}/v2/team/new/manifests/1.0") as resp:
        assert resp.status == 200 and await resp.read() == manifest
    stored = [p for p in (root / "blobs").rglob("*") if p.is_file()]
    assert layer in {p.read_bytes() for p in stored}
    async with http.delete(f"{url}/v2/team/new/manifests/{digest_of(manifest)}") as resp:
        assert resp.status == 202
    async with http.get(f"{url}/v2/team/new/manifests/1.0") as resp:
        assert resp.status == 404


async def test_make_app_refuses_a_push_from_another_host_and_stores_nothing(
        mirror_seen_from, http, upstream):
    url, root = await mirror_seen_from("192.0.2.7")
    status, _, _ = await push(http, url, "team/new", "1.0")
    assert status == 403
    blobs = root / "blobs"
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))
    async with http.get(f"{url}/v2/team/app/manifests/2.0") as resp:  # pulls go on
        assert resp.status == 200 and await resp.read() == upstream.images["team/app"].manifest
    url, root = await mirror_seen_from("192.0.2.7", access=cfg.Access(anonymous_push=True))
    assert (await push(http, url, "team/open", "1.0"))[0] == 201


async def test_anonymous_push_warns_at_start(mirror_seen_from, caplog):
    caplog.set_level(logging.INFO, logger="mirror")
    await mirror_seen_from(None, access=cfg.Access(anonymous_push=True))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "anonymous_push" in r.getMessage()]
    assert len(warnings) == 1 and "anyone" in warnings[0].getMessage()
    caplog.clear()
    await mirror_seen_from(None)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("taken only from this host" in r.getMessage() for r in caplog.records)
