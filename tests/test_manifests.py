"""Manifests: exact bytes and headers, tag TTL and HEAD revalidation, Accept classes, stale-if-error."""

import asyncio
import time

import pytest

from tests.conftest import fetched

DOCKER_ACCEPT = [  # the classic Docker daemon: four separate Accept lines, HEAD first
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
]
CONTAINERD_ACCEPT = ("application/vnd.docker.distribution.manifest.v2+json, "
                     "application/vnd.docker.distribution.manifest.list.v2+json, "
                     "application/vnd.oci.image.manifest.v1+json, "
                     "application/vnd.oci.image.index.v1+json, */*")
SINGLE_ONLY = ["application/vnd.docker.distribution.manifest.v2+json",
               "application/vnd.oci.image.manifest.v1+json"]


def accept(lines):
    return [("Accept", line) for line in lines]


async def request(http, method, url, lines=DOCKER_ACCEPT):
    async with http.request(method, url, headers=accept(lines)) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_docker_head_then_get_by_digest_gets_exact_headers_and_bytes(mirror, http,
                                                                          upstream):
    alpine = upstream.images["library/alpine"]
    status, headers, body = await request(http, "HEAD", f"{mirror.url}/v2/alpine/manifests/3.19")
    assert status == 200 and body == b""
    assert headers["Docker-Content-Digest"] == alpine.digest
    assert headers["Content-Type"] == alpine.media_type  # byte-exact: no charset
    assert headers["Content-Length"] == str(len(alpine.manifest))
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    # The HEAD cost the upstream a HEAD, not a (rate-limited) GET.
    assert fetched(upstream, "GET", "/manifests/") == 0
    status, headers, body = await request(
        http, "GET", f"{mirror.url}/v2/library/alpine/manifests/{alpine.digest}")
    assert status == 200 and body == alpine.manifest
    assert headers["Content-Type"] == alpine.media_type
    assert headers["Docker-Content-Digest"] == alpine.digest


async def test_containerd_resolves_with_ns_and_one_accept_line(mirror, http, upstream):
    oci = upstream.images["library/ociimage"]
    url = f"{mirror.url}/v2/library/ociimage/manifests/1.0?ns=docker.io"
    async with http.head(url, headers={"Accept": CONTAINERD_ACCEPT}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/vnd.oci.image.manifest.v1+json"
        assert resp.headers["Content-Length"] == str(len(oci.manifest))
        assert resp.headers["Docker-Content-Digest"] == oci.digest
    async with http.get(url, headers={"Accept": CONTAINERD_ACCEPT}) as resp:
        assert await resp.read() == oci.manifest


async def test_tag_within_ttl_makes_no_upstream_request(mirror, http, upstream):
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    first = await request(http, "GET", url)
    upstream.proxy.reset()
    for method in ("GET", "HEAD", "GET"):
        status, headers, body = await request(http, method, url)
        assert status == 200 and headers["Docker-Content-Digest"] == first[1]["Docker-Content-Digest"]
    assert upstream.proxy.requests == []


async def test_expired_tag_is_revalidated_with_head_only(start_mirror, http, upstream):
    mirror = await start_mirror(tag_ttl=0)
    app = upstream.images["team/app"]
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    assert (await request(http, "GET", url))[2] == app.manifest
    upstream.proxy.reset()
    for _ in range(3):
        assert (await request(http, "GET", url))[2] == app.manifest
    assert fetched(upstream, "HEAD", "/v2/team/app/manifests/2.0") == 3
    assert fetched(upstream, "GET") == 0


async def test_moved_tag_fetches_the_new_manifest_by_digest(start_mirror, http, upstream):
    mirror = await start_mirror(tag_ttl=0)
    old = upstream.push_image("test/moving", "v1", seed="old")
    url = f"{mirror.url}/v2/test/moving/manifests/v1"
    assert (await request(http, "GET", url))[2] == old.manifest
    new = upstream.push_image("test/moving", "v1", seed="new")
    upstream.proxy.reset()
    status, headers, body = await request(http, "GET", url)
    assert body == new.manifest and headers["Docker-Content-Digest"] == new.digest
    assert fetched(upstream, "HEAD", "/manifests/v1") == 1
    assert fetched(upstream, "GET", f"/manifests/{new.digest}") == 1
    assert fetched(upstream, "GET", "/manifests/v1") == 0


def push_docker_list(upstream, name, tag):
    """A Docker manifest list over amd64 and arm64 schema2 children, pushed as name:tag."""
    import dataclasses
    import json

    from tests.support import images
    children = [images.build_image(name, [], [{"arch": arch.encode()}], arch=arch, label=arch)
                for arch in ("amd64", "arm64")]
    index = images.build_index(name, [tag], children)
    document = json.loads(index.manifest)
    document["mediaType"] = "application/vnd.docker.distribution.manifest.list.v2+json"
    manifest = json.dumps(document, indent=3).encode()
    index = dataclasses.replace(index, manifest=manifest, digest=images.sha256(manifest),
                                media_type=document["mediaType"])
    return images.push(upstream.registry, upstream.tokens, index)


async def test_narrow_accept_never_overwrites_the_index_answer(mirror, http, upstream):
    """A registry answers a client that accepts no list with the amd64 child. That answer
    must not replace the list for the clients that accept one, or arm64 nodes get amd64."""
    index = push_docker_list(upstream, "test/docker-list", "latest")
    amd64 = index.children[0]
    url = f"{mirror.url}/v2/test/docker-list/manifests/latest"
    status, headers, body = await request(http, "GET", url)
    assert body == index.manifest and headers["Content-Type"] == index.media_type
    status, headers, body = await request(http, "GET", url, SINGLE_ONLY)
    assert (status, body) == (200, amd64.manifest)  # the upstream's answer for this client
    assert headers["Docker-Content-Digest"] == amd64.digest
    upstream.proxy.reset()
    for method in ("HEAD", "GET"):  # both classes now answered locally, each its own way
        status, headers, _ = await request(http, method, url)
        assert headers["Docker-Content-Digest"] == index.digest
        status, headers, _ = await request(http, method, url, SINGLE_ONLY)
        assert headers["Docker-Content-Digest"] == amd64.digest
    async with http.get(url, headers={"Accept": CONTAINERD_ACCEPT}) as resp:
        assert await resp.read() == index.manifest
    assert upstream.proxy.requests == []


async def test_client_that_does_not_accept_an_oci_index_is_not_served_one(mirror, http,
                                                                          upstream):
    url = f"{mirror.url}/v2/library/multiarch/manifests/latest"
    assert (await request(http, "GET", url))[2] == upstream.images["library/multiarch"].manifest
    status, headers, body = await request(http, "GET", url, SINGLE_ONLY)
    # Distribution 2.8 has no single-platform answer for an OCI index: its 404 is passed on,
    # where serving the cached index would hand the client a type it said it cannot read.
    assert status == 404 and b"MANIFEST_UNKNOWN" in body


async def test_tag_served_stale_when_upstream_down(start_mirror, http, upstream, caplog):
    mirror = await start_mirror(tag_ttl=0)
    app = upstream.images["team/app"]
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    await request(http, "GET", url)
    upstream.proxy.down()
    status, headers, body = await request(http, "GET", url)
    assert (status, body) == (200, app.manifest)
    assert "stale" in caplog.text


@pytest.mark.parametrize("code, headers", [(503, {}), (429, {"Retry-After": "1"})])
async def test_tag_served_stale_when_upstream_errs(start_mirror, http, upstream, code, headers):
    mirror = await start_mirror(tag_ttl=0)
    app = upstream.images["team/app"]
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    await request(http, "GET", url)
    upstream.proxy.status(code, headers, match="/manifests/")
    status, _, body = await request(http, "GET", url)
    assert (status, body) == (200, app.manifest)


async def test_uncached_tag_with_upstream_down_is_503_at_once(mirror, http, upstream):
    upstream.proxy.down()
    started = time.monotonic()
    status, headers, body = await request(http, "GET", f"{mirror.url}/v2/team/app/manifests/2.0")
    assert status == 503 and b'"UNAVAILABLE"' in body
    assert headers["Content-Type"] == "application/json"
    assert time.monotonic() - started < 5  # an error, not a hang: Docker then falls back


async def test_upstream_429_is_toomanyrequests_with_retry_after(mirror, http, upstream):
    upstream.proxy.status(429, {"Retry-After": "2"}, match="/manifests/", times=1)
    status, headers, body = await request(http, "GET", f"{mirror.url}/v2/team/app/manifests/2.0")
    assert status == 429 and headers["Retry-After"] == "2"
    assert b'"TOOMANYREQUESTS"' in body
    # The mirror holds its next request to that upstream until Retry-After has passed.
    started = time.monotonic()
    status, _, body = await request(http, "GET", f"{mirror.url}/v2/team/app/manifests/2.0")
    assert status == 200 and time.monotonic() - started >= 1.5


async def test_unknown_manifest_is_manifest_unknown(mirror, http, upstream):
    status, headers, body = await request(http, "GET", f"{mirror.url}/v2/team/app/manifests/nope")
    assert status == 404 and b'"MANIFEST_UNKNOWN"' in body


async def test_deleted_tag_stops_being_served_after_ttl(start_mirror, http, upstream):
    mirror = await start_mirror(tag_ttl=0)
    image = upstream.push_image("test/deleted", "gone", seed="deleted")
    url = f"{mirror.url}/v2/test/deleted/manifests/gone"
    assert (await request(http, "GET", url))[0] == 200
    upstream.delete_manifest("test/deleted", image.digest)
    status, _, body = await request(http, "GET", url)
    assert status == 404 and b"MANIFEST_UNKNOWN" in body
    # Content by digest is immutable: still served from the cache.
    url = f"{mirror.url}/v2/test/deleted/manifests/{image.digest}"
    assert (await request(http, "GET", url))[2] == image.manifest


async def test_corrupt_manifest_from_upstream_is_not_stored(mirror, http, upstream):
    oci = upstream.images["library/ociimage"]
    url = f"{mirror.url}/v2/library/ociimage/manifests/{oci.digest}"
    await request(http, "HEAD", f"{mirror.url}/v2/library/ociimage/manifests/1.0")  # auth first
    upstream.proxy.corrupt(offset=10, match=f"/manifests/{oci.digest}", method="GET", times=1)
    status, _, body = await request(http, "GET", url)
    assert status == 503 and b"does not match" in body
    status, _, body = await request(http, "GET", url)
    assert (status, body) == (200, oci.manifest)
    assert fetched(upstream, "GET", f"/manifests/{oci.digest}") == 2


async def test_restart_with_a_warm_cache_needs_no_upstream(start_mirror, http, upstream, tmp_path):
    from tests.conftest import skopeo_copy
    first = await start_mirror(root=tmp_path / "warm")
    await skopeo_copy(f"{first.host}/alpine:3.19", tmp_path / "a")
    await first.server.close()
    (tmp_path / "warm" / "tmp" / "fill-leftover").write_bytes(b"half a blob")
    second = await start_mirror(root=tmp_path / "warm")
    assert list((tmp_path / "warm" / "tmp").iterdir()) == []  # leftovers removed at start
    upstream.proxy.reset()
    got = await skopeo_copy(f"{second.host}/alpine:3.19", tmp_path / "b")
    assert got["digest"] == upstream.images["library/alpine"].digest
    assert upstream.proxy.requests == []


async def test_concurrent_tag_requests_share_one_upstream_request(mirror, http, upstream):
    url = f"{mirror.url}/v2/library/ociimage/manifests/1.0"
    results = await asyncio.gather(*(request(http, "GET", url) for _ in range(16)))
    assert {r[2] for r in results} == {upstream.images["library/ociimage"].manifest}
    assert fetched(upstream, "GET", "/manifests/1.0") == 1


async def test_large_manifest_arrives_whole_and_byte_exact(mirror, http, upstream):
    """A manifest of 2 MiB spans many TCP segments: every one of them must be read."""
    import dataclasses
    import json

    from tests.support import images
    base = images.small_image("test/large-manifest", ["big"], seed="large", oci=True)
    document = json.loads(base.manifest)
    document["annotations"] = {f"note.{i}": "x" * 1000 for i in range(2000)}
    manifest = json.dumps(document, indent=3).encode()
    image = images.push(upstream.registry, upstream.tokens, dataclasses.replace(
        base, manifest=manifest, digest=images.sha256(manifest)))
    status, headers, body = await request(http, "GET",
                                          f"{mirror.url}/v2/test/large-manifest/manifests/big")
    assert status == 200 and len(body) > 2_000_000
    assert body == image.manifest and headers["Docker-Content-Digest"] == image.digest


async def test_a_down_upstream_is_not_asked_again_on_every_request(start_mirror, http,
                                                                   upstream):
    mirror = await start_mirror(tag_ttl=0.5)
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    await request(http, "GET", url)
    await asyncio.sleep(0.6)
    upstream.proxy.reset()
    upstream.proxy.status(503, match="/manifests/")
    for _ in range(5):
        assert (await request(http, "GET", url))[2] == upstream.images["team/app"].manifest
    assert upstream.proxy.count(contains="/manifests/") == 1  # one failed check, then a pause
