"""The push-name policy (cache/names.py): a push can never take a name the default upstream
serves, a request that names an upstream is never answered from a hosted repository, and
the blob HEADs before a first push are answered without the upstream."""

from __future__ import annotations

import json

import pytest

from mirror import config as cfg
from mirror.cache.names import reserved
from mirror.reference import Router
from tests.conftest import fetched
from tests.test_push import MANIFEST, digest_of, image_manifest, push_blob, push_image

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                    "application/vnd.oci.image.manifest.v1+json, "
                    "application/vnd.oci.image.index.v1+json"}


async def answer(http, method: str, url: str, headers: dict | None = None,
                 **kwargs) -> tuple[int, dict | bytes]:
    async with http.request(method, url, headers={**ACCEPT, **(headers or {})}, **kwargs) as resp:
        body = await resp.read()
        if resp.headers.get("Content-Type") == "application/json" and resp.status >= 400:
            return resp.status, json.loads(body)["errors"][0]
        return resp.status, body


async def put_manifest(http, mirror, name: str, tag: str) -> tuple[int, dict | bytes]:
    config, layer = b'{"policy": 1}', b"a layer nobody may push there"
    manifest = image_manifest(config, [layer])
    return await answer(http, "PUT", f"{mirror.url}/v2/{name}/manifests/{tag}", data=manifest,
                        headers={"Content-Type": MANIFEST})


async def catalog(http, mirror) -> list[str]:
    async with http.get(f"{mirror.url}/v2/_catalog") as resp:
        return (await resp.json())["repositories"]


# Docker Hub's namespace rules: library/ and single-segment names.

@pytest.mark.parametrize("name, reason, upstream_name", [
    ("newhello", None, None), ("team/app", None, None), ("library", None, None),
    ("libraryx/app", None, None), ("hub", None, None), ("a/library/b", None, None),
    ("library/alpine", "library/alpine is in library/, the official images", "docker.io"),
    ("docker.io/library/alpine", "docker.io/library/alpine is under docker.io/", "docker.io"),
    ("hub/team/app", "hub/team/app is under hub/", "docker.io"),
    ("k8s.gcr.io/pause", "k8s.gcr.io/pause is under k8s.gcr.io/", "registry.k8s.io"),
])
def test_names_the_shipped_upstreams_keep_for_themselves(name, reason, upstream_name):
    found = reserved(name, Router(cfg.DEFAULT_UPSTREAMS))
    if reason is None:
        assert found is None
    else:
        assert found.startswith(reason) and f"upstream {upstream_name}" in found

@pytest.mark.parametrize("hosted", [cfg.Hosted(), cfg.Hosted(prefixes=("library/",))])
async def test_library_names_are_never_hosted_and_the_refusal_says_why(start_mirror, http,
                                                                       upstream, hosted):
    mirror = await start_mirror(hosted=hosted)
    status, error = await put_manifest(http, mirror, "library/alpine", "latest")
    assert status == 403 and error["code"] == "DENIED"
    assert "library/alpine" in error["message"] and "docker.io" in error["message"]
    assert "hosted.prefixes" in error["message"] and "team/alpine" in error["message"]
    status, error = await answer(http, "POST", f"{mirror.url}/v2/library/hello/blobs/uploads/")
    assert status == 403 and error["code"] == "DENIED"
    assert await catalog(http, mirror) == []
    assert list((mirror.root / "uploads").iterdir()) == []
    assert upstream.proxy.records == []
    # library/alpine is still Docker Hub's, for every client.
    alpine = upstream.images["library/alpine"]
    assert await answer(http, "GET", f"{mirror.url}/v2/library/alpine/manifests/latest") == \
        (200, alpine.manifest)


async def test_a_single_segment_name_is_refused_while_its_library_image_is_cached(
        mirror, http, upstream):
    alpine = upstream.images["library/alpine"]
    assert await answer(http, "GET", f"{mirror.url}/v2/library/alpine/manifests/3.19") == \
        (200, alpine.manifest)
    upstream.proxy.reset()
    status, error = await put_manifest(http, mirror, "alpine", "3.19")
    assert status == 403 and error["code"] == "DENIED"
    assert error["message"].startswith("alpine means library/alpine on upstream docker.io")
    assert error["detail"] == {"name": "alpine", "cached": "library/alpine"}
    status, error = await answer(http, "POST", f"{mirror.url}/v2/alpine/blobs/uploads/")
    assert status == 403 and error["code"] == "DENIED"
    # `docker pull mirror:5000/alpine` still gets Docker Hub's alpine, from the cache.
    assert await answer(http, "GET", f"{mirror.url}/v2/alpine/manifests/3.19") == \
        (200, alpine.manifest)
    assert await catalog(http, mirror) == ["library/alpine"]
    assert upstream.proxy.records == []


async def test_a_single_segment_name_not_cached_is_hosted_and_library_stays_upstream(
        mirror, http, upstream):
    _, manifest = await push_image(http, mirror, "alpine", "mine", b"single")
    assert upstream.proxy.records == []  # the push asked nobody
    assert await answer(http, "GET", f"{mirror.url}/v2/alpine/manifests/mine") == (200, manifest)
    # Every client configured with the mirror sends library/ (or ?ns=, or /hub/): Docker Hub's.
    alpine = upstream.images["library/alpine"]
    for path in ("/v2/library/alpine/manifests/3.19", "/v2/alpine/manifests/3.19?ns=docker.io",
                 "/hub/v2/alpine/manifests/3.19"):
        assert await answer(http, "GET", mirror.url + path) == (200, alpine.manifest), path
    assert fetched(upstream, "GET", "/v2/library/alpine/manifests/3.19") == 1
    # Now library/alpine is cached; the hosted alpine keeps its name and takes more pushes.
    _, manifest2 = await push_image(http, mirror, "alpine", "again", b"again")
    assert await answer(http, "GET", f"{mirror.url}/v2/alpine/manifests/again") == \
        (200, manifest2)
    assert await catalog(http, mirror) == ["alpine", "library/alpine"]


async def test_pushing_a_name_cached_from_the_default_upstream_is_refused_and_its_tags_stay(
        mirror, http, upstream):
    app = upstream.images["team/app"]
    assert await answer(http, "GET", f"{mirror.url}/v2/team/app/manifests/2.0") == \
        (200, app.manifest)
    status, error = await put_manifest(http, mirror, "team/app", "mine")
    assert status == 403 and error["code"] == "DENIED"
    assert error["message"].startswith("team/app is already cached from upstream docker.io")
    assert "team/app" in error["message"] and "hosted.prefixes" in error["message"]
    upstream.proxy.reset()
    assert await answer(http, "GET", f"{mirror.url}/v2/team/app/manifests/2.0") == \
        (200, app.manifest)
    assert upstream.proxy.records == []  # served from the cache, which nothing shadows


async def test_without_docker_hub_as_default_only_cached_names_are_kept(start_mirror, http,
                                                                        upstream):
    mirror = await start_mirror(upstreams=(
        cfg.Upstream("registry.example", upstream.url, default=True),))
    # No library/ rule on a registry that has none: library/thing is just a name.
    await push_image(http, mirror, "library/thing", "1", b"thing")
    app = upstream.images["team/app"]
    assert await answer(http, "GET", f"{mirror.url}/v2/team/app/manifests/2.0") == \
        (200, app.manifest)
    status, error = await put_manifest(http, mirror, "team/app", "mine")
    assert status == 403 and error["message"].startswith(
        "team/app is already cached from upstream registry.example")
    status, error = await put_manifest(http, mirror, "registry.example/x", "1")
    assert status == 403 and "registry.example/" in error["message"]
    assert await catalog(http, mirror) == ["library/thing", "team/app"]


async def test_with_no_upstream_every_valid_name_may_be_hosted(start_mirror, http):
    mirror = await start_mirror(upstreams=())
    for name in ("library/alpine", "alpine", "team/app"):
        await push_image(http, mirror, name, "1", name.encode())
    assert await catalog(http, mirror) == ["alpine", "library/alpine", "team/app"]


async def test_hosted_prefixes_and_hosted_enabled_are_asked_before_anything_is_stored(
        start_mirror, http, tmp_path):
    mirror = await start_mirror(root=tmp_path / "prefixed", hosted=cfg.Hosted(prefixes=("team/",)))
    status, error = await put_manifest(http, mirror, "other/app", "1")
    assert status == 403 and error["code"] == "DENIED"
    assert error["message"] == "other/app may not be hosted here; allowed prefixes: team/"
    await push_image(http, mirror, "team/app", "1", b"prefixed")
    assert await catalog(http, mirror) == ["team/app"]
    await mirror.server.close()
    closed = await start_mirror(root=tmp_path / "prefixed", hosted=cfg.Hosted(enabled=False))
    status, error = await answer(http, "POST", f"{closed.url}/v2/team/new/blobs/uploads/")
    assert status == 405 and "hosted.enabled = false" in error["message"]
    await push_image(http, closed, "team/app", "2", b"existing")  # kept as it was
    assert await catalog(http, closed) == ["team/app"]


async def test_a_library_repository_hosted_before_the_rule_is_neither_served_nor_pushed(
        start_mirror, http, upstream, tmp_path):
    """Data from a mirror that once took library/alpine: it shadows nothing any more."""
    root = tmp_path / "old"
    hosted_only = await start_mirror(root=root, upstreams=())
    _, poisoned = await push_image(http, hosted_only, "library/alpine", "3.19", b"poison")
    await hosted_only.server.close()
    mirror = await start_mirror(root=root)
    alpine = upstream.images["library/alpine"]
    status, body = await answer(http, "GET", f"{mirror.url}/v2/library/alpine/manifests/3.19")
    assert (status, body) == (200, alpine.manifest) and body != poisoned
    assert fetched(upstream, "GET", "/v2/library/alpine/manifests/3.19") == 1
    status, error = await put_manifest(http, mirror, "library/alpine", "3.19")
    assert status == 403 and error["code"] == "DENIED"


# A request that names an upstream is the upstream's.

async def test_ns_and_prefix_requests_are_never_answered_from_a_hosted_repository(
        mirror, http, upstream):
    _, manifest = await push_image(http, mirror, "team/app", "2.0", b"hosted")
    assert await answer(http, "GET", f"{mirror.url}/v2/team/app/manifests/2.0") == \
        (200, manifest)
    assert upstream.proxy.records == []
    app = upstream.images["team/app"]
    for path in ("/v2/team/app/manifests/2.0?ns=docker.io", "/hub/v2/team/app/manifests/2.0",
                 "/v2/team/app/manifests/2.0?ns=quay.io", "/v2/hub/team/app/manifests/2.0",
                 f"/v2/team/app/manifests/{app.digest}?ns=quay.io"):
        assert await answer(http, "GET", mirror.url + path) == (200, app.manifest), path
    status, body = await answer(http, "GET", f"{mirror.url}/v2/team/app/tags/list?ns=quay.io")
    assert status == 200 and json.loads(body)["tags"] == ["2.0"]
    status, body = await answer(http, "GET", f"{mirror.url}/v2/team/app/tags/list")
    assert status == 200 and json.loads(body)["tags"] == ["2.0"] and \
        fetched(upstream, "GET", "/tags/list") == 1  # the hosted list was not asked there
    # Pushes that name an upstream are refused like prefixed ones.
    status, error = await put_manifest(http, mirror, "team/app", "x?ns=docker.io")
    assert status == 405 and error["code"] == "UNSUPPORTED"
    status, error = await answer(http, "POST", f"{mirror.url}/v2/team/app/blobs/uploads/"
                                               "?ns=quay.io")
    assert status == 405 and error["code"] == "UNSUPPORTED"


# The blob HEADs before a first push.

async def head_blob(http, mirror, name: str, digest: str) -> tuple[int, str | None, str]:
    async with http.head(f"{mirror.url}/v2/{name}/blobs/{digest}") as resp:
        length = resp.headers.get("Content-Length") if resp.status == 200 else None
        return resp.status, length, resp.headers.get("Docker-Content-Digest", "")


SETUPS = {
    "online": {},
    "offline": {"server": cfg.Server(listen="127.0.0.1:0", offline=True)},
    "offline-with-prefixes": {"server": cfg.Server(listen="127.0.0.1:0", offline=True),
                              "hosted": cfg.Hosted(prefixes=("fresh/",))},
    "unreachable": {"url": "http://127.0.0.1:9"},
    "no-upstream": {"upstreams": ()},
}


@pytest.mark.parametrize("setup", list(SETUPS))
async def test_blob_head_before_a_first_push_is_answered_from_the_store(start_mirror, http,
                                                                        upstream, setup):
    mirror = await start_mirror(**SETUPS[setup])
    stored = await push_blob(http, mirror, "fresh/other", b"already in the store")
    absent = digest_of(b"never stored")
    upstream.proxy.reset()
    assert await head_blob(http, mirror, "fresh/app", absent) == (404, None, "")
    assert await head_blob(http, mirror, "fresh/app", stored) == (
        200, str(len(b"already in the store")), stored)
    assert await head_blob(http, mirror, "freshapp", absent) == (404, None, "")
    assert upstream.proxy.records == [] and upstream.tokens.requests == []
    async with http.head(f"{mirror.url}/v2/fresh/app/blobs/{absent}") as resp:
        assert resp.headers["Content-Type"] == "application/json"  # BLOB_UNKNOWN, as JSON
    _, manifest = await push_image(http, mirror, "fresh/app", "1", b"first push")
    assert await answer(http, "GET", f"{mirror.url}/v2/fresh/app/manifests/1") == (200, manifest)
    assert upstream.proxy.records == [] and upstream.tokens.requests == []


async def test_blob_head_of_a_cached_repository_still_asks_the_upstream(mirror, http, upstream):
    alpine = upstream.images["library/alpine"]
    await answer(http, "GET", f"{mirror.url}/v2/library/alpine/manifests/3.19")
    absent = digest_of(b"not a layer of alpine")
    assert (await head_blob(http, mirror, "library/alpine", absent))[0] == 404
    assert fetched(upstream, "HEAD", f"/v2/library/alpine/blobs/{absent}") == 1
    layer = alpine.layer_digests[0]
    assert await head_blob(http, mirror, "alpine", layer) == (
        200, str(len(alpine.blobs[layer])), layer)
    assert fetched(upstream, "HEAD", f"/v2/library/alpine/blobs/{layer}") == 1
    assert fetched(upstream, "GET", "/blobs/") == 0  # a HEAD never fetches a body
