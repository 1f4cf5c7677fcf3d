"""Smoke tests for tests/support: the fake upstream behaves like a registry, and every fault
the proxy offers does what it says. Tests here talk HTTP directly (no mirror involved)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import aiohttp
import pytest

from tests.support import images as imagelib
from tests.support.stack import Upstream

# Loads the `upstream` fixture and the per-test reset; deduplicated if conftest loads it too.
pytest_plugins = ["tests.support.fixtures"]

ACCEPT = ", ".join([imagelib.DOCKER_MANIFEST, imagelib.OCI_MANIFEST, imagelib.OCI_INDEX])


def fetch(url: str, path: str, headers: dict[str, str] | None = None,
          method: str = "GET") -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection; never raises on a status, unlike urllib."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def token(up: Upstream, repo: str, user: str | None = None, password: str = "") -> str:
    query = urlencode({"service": "test-registry", "scope": f"repository:{repo}:pull"})
    headers = {}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    status, _, body = fetch(up.tokens.url, f"/token?{query}", headers)
    assert status == 200, body
    return json.loads(body)["token"]


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}", "Accept": ACCEPT}


def blob_path(image: imagelib.Image, index: int = -1) -> str:
    return f"/v2/{image.name}/blobs/{image.layer_digests[index]}"


# -- tokens and the registry -----------------------------------------------------------


def test_anonymous_token_flow(upstream: Upstream) -> None:
    alpine = upstream.images["library/alpine"]
    status, headers, _ = fetch(upstream.url, "/v2/library/alpine/manifests/3.19")
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{upstream.token_url}",service="test-registry"')
    assert 'scope="repository:library/alpine:pull"' in challenge

    query = urlencode([("service", "test-registry"),
                       ("scope", "repository:library/alpine:pull"),
                       ("scope", "repository:library/ociimage:pull,push")])
    status, _, body = fetch(upstream.tokens.url, f"/token?{query}")
    answer = json.loads(body)
    assert status == 200 and answer["token"] == answer["access_token"]
    assert answer["expires_in"] == 300 and answer["issued_at"].endswith("Z")
    header_b64, claims_b64, _ = answer["token"].split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    header = json.loads(base64.urlsafe_b64decode(pad(header_b64)))
    claims = json.loads(base64.urlsafe_b64decode(pad(claims_b64)))
    assert header["alg"] == "ES256" and header["x5c"]
    assert claims["aud"] == "test-registry" and claims["sub"] == ""
    assert claims["access"] == [
        {"type": "repository", "name": "library/alpine", "actions": ["pull"]},
        {"type": "repository", "name": "library/ociimage", "actions": ["pull"]},  # no push
    ]

    status, headers, body = fetch(upstream.url, "/v2/library/alpine/manifests/3.19",
                                  auth(answer["token"]))
    assert status == 200 and body == alpine.manifest
    assert headers["Docker-Content-Digest"] == alpine.digest
    assert headers["Content-Type"] == imagelib.DOCKER_MANIFEST
    assert upstream.tokens.requests[0]["username"] is None
    assert upstream.tokens.requests[0]["scopes"] == ["repository:library/alpine:pull",
                                                     "repository:library/ociimage:pull,push"]


def test_private_needs_a_user(upstream: Upstream) -> None:
    path = "/v2/private/secret/manifests/1"
    status, _, _ = fetch(upstream.url, path, auth(token(upstream, "private/secret")))
    assert status == 401  # the token is issued, but grants nothing
    for user, password in [("reader", "readpass"), ("admin", "secret")]:
        status, _, body = fetch(upstream.url, path,
                                auth(token(upstream, "private/secret", user, password)))
        assert status == 200 and body == upstream.images["private/secret"].manifest
    bad = {"Authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()}
    status, _, _ = fetch(upstream.tokens.url, "/token?service=test-registry", bad)
    assert status == 401
    assert [r["status"] for r in upstream.tokens.requests] == [200, 200, 200, 401]


def test_index_tags_and_seeded_content(upstream: Upstream) -> None:
    multi = upstream.images["library/multiarch"]
    assert [c.platform["architecture"] for c in multi.children] == ["amd64", "arm64"]
    tok = token(upstream, "library/multiarch")
    status, headers, body = fetch(upstream.url, "/v2/library/multiarch/manifests/latest", auth(tok))
    assert (status, body, headers["Content-Type"]) == (200, multi.manifest, imagelib.OCI_INDEX)
    child = multi.children[1]
    status, _, body = fetch(upstream.url, f"/v2/library/multiarch/manifests/{child.digest}", auth(tok))
    assert status == 200 and body == child.manifest

    tok = token(upstream, "library/manytags")
    status, _, body = fetch(upstream.url, "/v2/library/manytags/tags/list", auth(tok))
    assert sorted(json.loads(body)["tags"]) == sorted(upstream.images["library/manytags"].tags)
    assert len(json.loads(body)["tags"]) == 33
    # Deterministic: building again gives the very same digests.
    again = imagelib.standard_images()
    assert {n: i.digest for n, i in again.items()} == {n: i.digest for n, i in upstream.images.items()}


def test_push_retag_and_delete(upstream: Upstream) -> None:
    first = upstream.push_image("smoke/changing", "v1", seed=1)
    second = upstream.push_image("smoke/changing", "v1", seed=2)  # moves the tag
    assert first.digest != second.digest
    tok = token(upstream, "smoke/changing")
    _, headers, _ = fetch(upstream.url, "/v2/smoke/changing/manifests/v1", auth(tok))
    assert headers["Docker-Content-Digest"] == second.digest
    upstream.tag_image(first, "old")
    upstream.delete_tag("smoke/changing", "v1")
    assert fetch(upstream.url, "/v2/smoke/changing/manifests/v1", auth(tok))[0] == 404
    _, headers, _ = fetch(upstream.url, "/v2/smoke/changing/manifests/old", auth(tok))
    assert headers["Docker-Content-Digest"] == first.digest


# -- a real client through the proxy ---------------------------------------------------


def skopeo_copy(upstream: Upstream, ref: str, dest: str, *extra: str) -> None:
    host = urlsplit(upstream.url).netloc
    # A private HOME and auth file: no credentials from this machine leak into the test.
    home = Path(dest.split(":")[1]).parent
    env = {**os.environ, "HOME": str(home), "REGISTRY_AUTH_FILE": str(home / "auth.json")}
    # tls-verify=false lets skopeo fall back from https to plain http.
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                    "--src-no-creds", *extra, f"docker://{host}/{ref}", dest],
                   check=True, env=env, timeout=60, capture_output=True)


def oci_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


def test_skopeo_copies_through_the_proxy(upstream: Upstream, tmp_path: Path) -> None:
    alpine = upstream.images["library/alpine"]
    skopeo_copy(upstream, "library/alpine:3.19", f"oci:{tmp_path}/alpine:3.19")
    # For an oci: layout skopeo converts schema2 to OCI: a new manifest and a re-serialized
    # config, but the layers it fetched are byte-identical to what was pushed.
    for digest in alpine.layer_digests:
        assert oci_blob(tmp_path / "alpine", digest) == alpine.blobs[digest]
    index = json.loads((tmp_path / "alpine" / "index.json").read_text())
    manifest = json.loads(oci_blob(tmp_path / "alpine", index["manifests"][0]["digest"]))
    config = oci_blob(tmp_path / "alpine", manifest["config"]["digest"])
    assert json.loads(config) == json.loads(alpine.blobs[alpine.config_digest])
    assert upstream.proxy.body_bytes(contains="/blobs/") == sum(map(len, alpine.blobs.values()))

    # A dir: copy keeps the schema2 manifest as fetched: same bytes, same digest.
    skopeo_copy(upstream, "library/alpine:3.19", f"dir:{tmp_path}/alpine-dir")
    assert (tmp_path / "alpine-dir" / "manifest.json").read_bytes() == alpine.manifest

    # An OCI index, all platforms: every document lands under the digest it was pushed as.
    multi = upstream.images["library/multiarch"]
    skopeo_copy(upstream, "library/multiarch:latest", f"oci:{tmp_path}/multi:latest", "--all")
    index = json.loads((tmp_path / "multi" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == multi.digest
    for document in [multi, *multi.children]:
        assert oci_blob(tmp_path / "multi", document.digest) == document.manifest
    for digest, data in multi.blobs.items():
        assert oci_blob(tmp_path / "multi", digest) == data
    assert upstream.proxy.count("GET", contains="/v2/library/multiarch/blobs/") == len(multi.blobs)


# -- faults ----------------------------------------------------------------------------


def test_counting_and_raw_paths(upstream: Upstream) -> None:
    tok = token(upstream, "library/manytags")
    odd = "/v2/library/manytags/tags/list?n=5&last=t%30%33"  # escapes must not be normalised
    assert fetch(upstream.url, odd, auth(tok))[0] == 200
    fetch(upstream.url, "/v2/library/manytags/manifests/t01", auth(tok), method="HEAD")
    assert upstream.proxy.requests == [("GET", odd), ("HEAD", "/v2/library/manytags/manifests/t01")]
    assert upstream.proxy.count(method="HEAD") == 1
    assert upstream.proxy.count(contains="tags/list") == 1


def test_cut_gives_a_short_body(upstream: Upstream) -> None:
    alpine = upstream.images["library/alpine"]
    path = blob_path(alpine)
    upstream.proxy.cut(at=100_000, match=path, times=1)
    parts = urlsplit(upstream.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", path, headers=auth(token(upstream, alpine.name)))
    resp = conn.getresponse()
    assert int(resp.headers["Content-Length"]) == len(alpine.blobs[alpine.layer_digests[-1]])
    with pytest.raises(http.client.IncompleteRead) as short:
        resp.read()
    conn.close()
    assert len(short.value.partial) == 100_000
    assert upstream.proxy.body_bytes(contains=path) == 100_000
    # times=1: the next request is whole.
    assert len(fetch(upstream.url, path, auth(token(upstream, alpine.name)))[2]) > 3_000_000


def test_corrupt_flips_one_byte(upstream: Upstream) -> None:
    alpine = upstream.images["library/alpine"]
    good = alpine.blobs[alpine.layer_digests[-1]]
    upstream.proxy.corrupt(offset=200_000, match="/blobs/")
    _, _, body = fetch(upstream.url, blob_path(alpine), auth(token(upstream, alpine.name)))
    assert len(body) == len(good)
    assert [i for i in range(len(good)) if body[i] != good[i]] == [200_000]


def test_status_answers_without_the_registry(upstream: Upstream) -> None:
    upstream.proxy.status(429, {"Retry-After": "2"}, b"slow down", match="/manifests/", times=1)
    status, headers, body = fetch(upstream.url, "/v2/library/alpine/manifests/3.19")
    assert (status, headers["Retry-After"], body) == (429, "2", b"slow down")
    assert fetch(upstream.url, "/v2/library/alpine/manifests/3.19")[0] == 401  # registry again


def test_down_refuses_then_up_restores(upstream: Upstream) -> None:
    port = upstream.proxy.port
    upstream.proxy.down()
    with pytest.raises(ConnectionRefusedError):
        fetch(upstream.url, "/v2/")
    upstream.proxy.up()
    assert upstream.proxy.port == port and fetch(upstream.url, "/v2/")[0] == 401


def test_delay(upstream: Upstream) -> None:
    upstream.proxy.delay(0.5, match="/v2/")
    start = time.monotonic()
    assert fetch(upstream.url, "/v2/")[0] == 401
    assert time.monotonic() - start >= 0.5


async def test_stall_holds_until_release(upstream: Upstream) -> None:
    # An async test on pytest-asyncio's own loop: the proxy runs on its thread, untouched.
    alpine = upstream.images["library/alpine"]
    upstream.proxy.stall(after=50_000, match="/blobs/")
    async with aiohttp.ClientSession() as session:
        async with session.get(upstream.url + blob_path(alpine),
                               headers=auth(token(upstream, alpine.name))) as resp:
            head = await resp.content.readexactly(50_000)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(resp.content.read(1), 0.5)
            assert upstream.proxy.stalled == 1
            upstream.proxy.release()
            rest = await resp.content.read()
    assert head + rest == alpine.blobs[alpine.layer_digests[-1]]


async def test_throttle_slows_the_body(upstream: Upstream) -> None:
    app = upstream.images["team/app"]
    layer = app.blobs[app.layer_digests[-1]]  # ~100 KiB
    upstream.proxy.throttle(200_000, match="/blobs/")
    async with aiohttp.ClientSession() as session:
        start = time.monotonic()
        async with session.get(upstream.url + blob_path(app),
                               headers=auth(token(upstream, app.name))) as resp:
            await asyncio.sleep(0.2)
            partial = upstream.proxy.body_bytes(contains="/blobs/")
            body = await resp.read()
    assert 0 < partial < len(layer)
    assert body == layer and time.monotonic() - start >= 0.4
