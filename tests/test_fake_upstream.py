"""What Distribution cannot produce, from a small in-process fake registry on a real socket:
blob redirects to a CDN on another host (Docker Hub, GHCR), signed schema1 manifests, a
Basic challenge (Quay), a referrers API, and an upstream that ignores Range."""

from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp
import pytest
from aiohttp import web

from mirror import config as cfg

BLOB = bytes(range(256)) * 4096  # 1 MiB
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
CHUNKED = bytes(range(255, -1, -1)) * 2000
CHUNKED_DIGEST = "sha256:" + hashlib.sha256(CHUNKED).hexdigest()
# A signed schema1 manifest's digest is over its payload without signatures, so it differs
# from sha256(body): only the upstream's Docker-Content-Digest header knows it.
SCHEMA1 = json.dumps({"schemaVersion": 1, "name": "old/image", "tag": "v1",
                      "fsLayers": [{"blobSum": BLOB_DIGEST}],
                      "signatures": [{"signature": "c2ln"}]}, indent=3).encode()
SCHEMA1_DIGEST = "sha256:" + "5" * 64
SCHEMA1_TYPE = "application/vnd.docker.distribution.manifest.v1+prettyjws"
REFERRERS = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": []}).encode()
# A CDN's signed URL: any re-quoting of %2F or %3D breaks the signature.
SIGNED_QUERY = "sig=ab%2Fcd%3D%3D&Expires=99"


class Fake:
    """A registry answering Basic challenges, redirecting blobs to a `cdn` on another host."""

    def __init__(self):
        self.seen: list[tuple[str, str, str | None]] = []  # (host, path_qs, Authorization)
        self.ignore_range = False
        self.ranges: list[str | None] = []  # the Range header of each CDN request
        self.cut_after: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        self.seen.append((request.host, request.raw_path, auth))
        if request.path.startswith("/cdn/"):
            return await self.cdn(request)
        if auth != "Basic dXNlcjpwYXNz":  # user:pass
            return web.Response(status=401, headers={
                "WWW-Authenticate": 'Basic realm="fake"'})
        if request.path == "/v2/old/image/manifests/v1" or \
                request.path == f"/v2/old/image/manifests/{SCHEMA1_DIGEST}":
            return web.Response(body=SCHEMA1, headers={
                "Content-Type": SCHEMA1_TYPE, "Docker-Content-Digest": SCHEMA1_DIGEST})
        if request.path == f"/v2/old/image/blobs/{BLOB_DIGEST}":
            cdn = f"http://localhost:{request.url.port}/cdn/blob?{SIGNED_QUERY}"
            return web.Response(status=307, headers={"Location": cdn})
        if request.path == f"/v2/old/image/blobs/{CHUNKED_DIGEST}":
            response = web.StreamResponse()
            response.enable_chunked_encoding()  # no Content-Length: the size is unknown
            await response.prepare(request)
            for i in range(0, len(CHUNKED), 100_000):
                await response.write(CHUNKED[i:i + 100_000])
            await response.write_eof()
            return response
        if request.path == "/v2/odd/list/tags/list":  # a broken registry's tag list
            return web.Response(body=b'{"name": "odd/list", "tags": 5}',
                                headers={"Content-Type": "application/json"})
        if request.path.startswith("/v2/old/image/referrers/"):
            return web.Response(body=REFERRERS, headers={
                "Content-Type": "application/vnd.oci.image.index.v1+json",
                "OCI-Filters-Applied": "artifactType"})
        return web.Response(status=404)

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        if request.raw_path != f"/cdn/blob?{SIGNED_QUERY}" or \
                "Authorization" in request.headers:
            return web.Response(status=403, text="signature mismatch or stray credentials")
        self.ranges.append(request.headers.get("Range"))
        start = 0
        if not self.ignore_range and (r := request.headers.get("Range")):
            start = int(r.removeprefix("bytes=").rstrip("-"))
        response = web.StreamResponse(status=206 if start else 200)
        response.content_length = len(BLOB) - start
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"
        await response.prepare(request)
        body = BLOB[start:]
        if self.cut_after is not None:
            await response.write(body[:self.cut_after])
            self.cut_after = None
            request.transport.abort()
            return response
        await response.write(body)
        return response


@pytest.fixture
async def fake(aiohttp_server):
    fake = Fake()
    server = await aiohttp_server(fake.app())
    fake.url = f"http://127.0.0.1:{server.port}"
    return fake


@pytest.fixture
async def mirror_on_fake(start_mirror, fake, tmp_path):
    return await start_mirror(root=tmp_path / "fake", upstreams=(
        cfg.Upstream("quay.io", fake.url, default=True, username="user", password="pass"),))


async def test_blob_redirect_is_followed_byte_exact_without_credentials(mirror_on_fake, fake, http):
    async with http.get(f"{mirror_on_fake.url}/v2/old/image/blobs/{BLOB_DIGEST}") as resp:
        assert resp.status == 200 and await resp.read() == BLOB
    cdn = [s for s in fake.seen if s[1].startswith("/cdn/")]
    assert cdn == [(f"localhost:{fake.url.rsplit(':', 1)[1]}", f"/cdn/blob?{SIGNED_QUERY}", None)]


async def test_basic_challenge_is_answered_with_the_configured_credentials(mirror_on_fake,
                                                                           fake, http):
    async with http.get(f"{mirror_on_fake.url}/v2/old/image/manifests/v1") as resp:
        assert resp.status == 200
    auths = [s[2] for s in fake.seen]
    assert auths == [None, "Basic dXNlcjpwYXNz"]
    async with http.get(f"{mirror_on_fake.url}/v2/old/image/referrers/{BLOB_DIGEST}") as resp:
        assert resp.status == 200
    # Once challenged with Basic, later requests send it up front: no second 401.
    assert [s[2] for s in fake.seen][2:] == ["Basic dXNlcjpwYXNz"]


async def test_signed_schema1_keeps_the_upstreams_digest(mirror_on_fake, fake, http):
    async with http.get(f"{mirror_on_fake.url}/v2/old/image/manifests/v1") as resp:
        assert await resp.read() == SCHEMA1
        assert resp.headers["Content-Type"] == SCHEMA1_TYPE
        assert resp.headers["Docker-Content-Digest"] == SCHEMA1_DIGEST
    seen = len(fake.seen)
    async with http.get(f"{mirror_on_fake.url}/v2/old/image/manifests/{SCHEMA1_DIGEST}") as resp:
        assert await resp.read() == SCHEMA1
        assert resp.headers["Docker-Content-Digest"] == SCHEMA1_DIGEST
    assert len(fake.seen) == seen  # by digest, from the cache


async def test_referrers_pass_through_with_filters_header(mirror_on_fake, fake, http):
    url = f"{mirror_on_fake.url}/v2/old/image/referrers/{BLOB_DIGEST}?artifactType=a%2Fb"
    async with http.get(url) as resp:
        assert resp.status == 200 and await resp.read() == REFERRERS
        assert resp.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"
        assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    assert fake.seen[-1][1] == f"/v2/old/image/referrers/{BLOB_DIGEST}?artifactType=a%2Fb"


@pytest.mark.parametrize("ignore_range", [False, True])
async def test_resume_after_a_cut_with_or_without_upstream_range(mirror_on_fake, fake, http,
                                                                 ignore_range):
    fake.ignore_range = ignore_range
    fake.cut_after = 300_000
    url = f"{mirror_on_fake.url}/v2/old/image/blobs/{BLOB_DIGEST}"
    async with http.get(url) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    async with http.get(url) as resp:
        assert resp.status == 200 and await resp.read() == BLOB
    first, second = fake.ranges
    assert first is None and 0 < int(second.removeprefix("bytes=").rstrip("-")) <= 300_000


async def test_blob_of_unknown_length_streams_chunked_then_serves_with_length(mirror_on_fake,
                                                                              fake, http):
    url = f"{mirror_on_fake.url}/v2/old/image/blobs/{CHUNKED_DIGEST}"
    async with http.get(url) as resp:
        assert resp.status == 200 and "Content-Length" not in resp.headers
        assert await resp.read() == CHUNKED
    while CHUNKED_DIGEST in mirror_on_fake.proxy.fills.active:
        await asyncio.sleep(0.01)
    async with http.get(url) as resp:
        assert resp.headers["Content-Length"] == str(len(CHUNKED))
        assert await resp.read() == CHUNKED
    assert sum(CHUNKED_DIGEST in s[1] for s in fake.seen) == 2  # a 401, then one fetch


async def test_a_tag_list_that_is_not_a_list_is_a_clean_503(mirror_on_fake, http):
    async with http.get(f"{mirror_on_fake.url}/v2/odd/list/tags/list") as resp:
        assert resp.status == 503  # it was a TypeError: a 500 and a traceback
        error = (await resp.json())["errors"][0]
        assert error["code"] == "UNAVAILABLE" and "unreadable tag list" in error["message"]
