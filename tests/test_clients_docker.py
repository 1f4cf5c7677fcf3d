"""Docker's pulls through `registry-mirrors` that the engine here cannot make, replayed
request by request.

The classic image store with a bare mirror URL is tested with a real dockerd (20.10) in
test_engine_docker.py: pulls, a multi-arch index, the fallback to Docker Hub, `docker pull
mirror/alpine`, push, login. What 20.10 cannot do stays here, from PROTOCOL.md: Docker 29's
containerd image store (no ping, `?ns=docker.io`, one comma-joined `Accept` ending in `*/*`,
`Accept-Encoding: zstd, gzip, deflate`), and Docker >= 25's mirror with a path
(`registry-mirrors: ["https://m/hub"]`, which 20.10 refuses), with the `Range: bytes=N-`
resume of a broken download that the engine tests do not provoke. Docker abandons a mirror
over a missing header, so every header it reads is checked, with the bytes and the number
of upstream requests.
"""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from tests.conftest import fetched, sha256
from tests.support.images import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# moby distribution/pull_v2.go: one Accept line per type, no */*.
CLASSIC_ACCEPT = [DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX]
# containerd remotes/docker/resolver.go: one line, comma-joined, */* last.
CONTAINERD_ACCEPT = f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"
CONTAINERD_ENCODING = "zstd, gzip, deflate"
API_VERSION = "registry/2.0"


def classic_headers(*extra: tuple[str, str]) -> CIMultiDict:
    # Go's transport adds Accept-Encoding: gzip by itself (and would decode a gzip reply).
    return CIMultiDict([*(("Accept", a) for a in CLASSIC_ACCEPT), ("Accept-Encoding", "gzip"),
                        ("User-Agent", "docker/28.0.0 go/go1.23"), *extra])


def assert_manifest_headers(resp, image) -> None:
    """What Docker and containerd read from a manifest response, HEAD or GET."""
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == image.digest
    # Exactly the stored type: a charset or another type breaks Docker's schema switch.
    assert resp.headers["Content-Type"] == image.media_type
    assert resp.headers["Content-Length"] == str(len(image.manifest))
    assert resp.headers["Docker-Distribution-API-Version"] == API_VERSION
    assert "Content-Encoding" not in resp.headers


async def test_docker_25_classic_pull_through_a_mirror_with_a_path(mirror, upstream, http):
    alpine = upstream.images["library/alpine"]
    root = f"{mirror.url}/hub/v2"

    # Ping: 200 means "no auth", so Docker will never send credentials to this mirror.
    async with http.get(f"{root}/", headers=classic_headers()) as resp:
        assert resp.status == 200 and await resp.read() == b"{}"
        assert resp.headers["Docker-Distribution-API-Version"] == API_VERSION

    async with http.head(f"{root}/library/alpine/manifests/3.19",
                         headers=classic_headers()) as resp:
        assert_manifest_headers(resp, alpine)
        assert await resp.read() == b""

    async with http.get(f"{root}/library/alpine/manifests/{alpine.digest}",
                        headers=classic_headers()) as resp:
        assert_manifest_headers(resp, alpine)
        body = await resp.read()
    assert body == alpine.manifest and sha256(body) == alpine.digest

    config, small_layer, big_layer = (alpine.config_digest, *alpine.layer_digests)
    for digest in (config, small_layer):
        async with http.get(f"{root}/library/alpine/blobs/{digest}",
                            headers=classic_headers()) as resp:
            assert resp.status == 200
            assert resp.headers["Docker-Content-Digest"] == digest
            assert resp.headers["Content-Length"] == str(len(alpine.blobs[digest]))
            assert "Content-Encoding" not in resp.headers
            assert await resp.read() == alpine.blobs[digest]

    # A download broken off at N resumes with Range: bytes=N-, and only a 206 with
    # Content-Range: bytes N-E/SIZE is accepted (moby registry/resumable).
    data = alpine.blobs[big_layer]
    offset = 1_000_003
    async with http.get(f"{root}/library/alpine/blobs/{big_layer}",
                        headers=classic_headers(("Range", f"bytes={offset}-"))) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {offset}-{len(data) - 1}/{len(data)}"
        assert resp.headers["Content-Length"] == str(len(data) - offset)
        assert "Content-Encoding" not in resp.headers
        assert await resp.read() == data[offset:]

    # The same resume once the blob is cached, now from the mirror's disk.
    async with http.get(f"{root}/library/alpine/blobs/{big_layer}",
                        headers=classic_headers(("Range", f"bytes={offset}-"))) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {offset}-{len(data) - 1}/{len(data)}"
        assert await resp.read() == data[offset:]

    # The upstream: one manifest download and one download per blob, Range or not.
    assert fetched(upstream, "GET", "/v2/library/alpine/manifests/") == 1
    for digest in alpine.blobs:
        assert fetched(upstream, "GET", f"/v2/library/alpine/blobs/{digest}") == 1


@pytest.mark.parametrize("base", ["", "/hub"])
async def test_docker_29_containerd_store_pull_through_registry_mirrors(
        mirror, upstream, http, base):
    oci = upstream.images["library/ociimage"]
    root = f"{mirror.url}{base}/v2"
    accept = {"Accept": CONTAINERD_ACCEPT, "User-Agent": "containerd/v2.1.4"}

    # No ping: the first request is the resolve.
    async with http.head(f"{root}/library/ociimage/manifests/1.0?ns=docker.io",
                         headers=accept) as resp:
        assert_manifest_headers(resp, oci)

    fetch = {"Accept-Encoding": CONTAINERD_ENCODING, "User-Agent": "containerd/v2.1.4"}
    async with http.get(f"{root}/library/ociimage/manifests/{oci.digest}?ns=docker.io",
                        headers={**fetch, "Accept": f"{oci.media_type}, */*"}) as resp:
        assert_manifest_headers(resp, oci)
        assert await resp.read() == oci.manifest

    layer_type = oci.document["layers"][0]["mediaType"]
    for digest, data in oci.blobs.items():
        async with http.get(f"{root}/library/ociimage/blobs/{digest}?ns=docker.io",
                            headers={**fetch, "Accept": f"{layer_type}, */*"}) as resp:
            assert resp.status == 200
            assert resp.headers["Docker-Content-Digest"] == digest
            assert resp.headers["Content-Length"] == str(len(data))
            # containerd would decode a Content-Encoding, then the digest would not match.
            assert "Content-Encoding" not in resp.headers
            assert await resp.read() == data

    big = oci.layer_digests[1]
    async with http.get(f"{root}/library/ociimage/blobs/{big}?ns=docker.io",
                        headers={**fetch, "Range": "bytes=1000-"}) as resp:
        assert resp.status == 206
        size = len(oci.blobs[big])
        assert resp.headers["Content-Range"] == f"bytes 1000-{size - 1}/{size}"
        assert await resp.read() == oci.blobs[big][1000:]

    assert fetched(upstream, "GET", "/v2/library/ociimage/manifests/") == 1
    for digest in oci.blobs:
        assert fetched(upstream, "GET", f"/v2/library/ociimage/blobs/{digest}") == 1
    assert not any("ns=" in r.path or "/hub" in r.path for r in upstream.proxy.records)


async def test_containerd_store_resolves_a_multi_arch_tag_to_its_index(mirror, upstream, http):
    """containerd picks the platform itself: it must be given the index, not one child."""
    index = upstream.images["library/multiarch"]
    for base in ("", "/hub"):
        async with http.head(f"{mirror.url}{base}/v2/library/multiarch/manifests/latest"
                             "?ns=docker.io", headers={"Accept": CONTAINERD_ACCEPT}) as resp:
            assert_manifest_headers(resp, index)
        async with http.get(f"{mirror.url}{base}/v2/library/multiarch/manifests/{index.digest}"
                            "?ns=docker.io", headers={"Accept": f"{OCI_INDEX}, */*",
                                                      "Accept-Encoding": CONTAINERD_ENCODING}
                            ) as resp:
            assert_manifest_headers(resp, index)
            assert await resp.read() == index.manifest
    assert fetched(upstream, "GET", f"/v2/library/multiarch/manifests/{index.digest}") == 1
