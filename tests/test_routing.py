"""Routing (ns, prefixes, default, library/), tag and catalog pagination, referrers, hostile input."""

import json

import pytest
from yarl import URL

from tests.conftest import fetched

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                    "application/vnd.oci.image.manifest.v1+json, "
                    "application/vnd.oci.image.index.v1+json"}


async def get(http, url, method="GET"):
    # encoded=True: send the path byte for byte, as a hostile client would (yarl would
    # otherwise resolve %2e%2e on our side before the mirror ever saw it).
    async with http.request(method, URL(url, encoded=True), headers=ACCEPT) as resp:
        return resp.status, resp.headers, await resp.read()


async def test_ns_picks_the_upstream(mirror, http, upstream):
    status, headers, _ = await get(http, f"{mirror.url}/v2/alpine/manifests/3.19?ns=docker.io")
    assert status == 200
    assert fetched(upstream, contains="/v2/library/alpine/manifests/3.19") == 1
    # quay.io adds no library/: the same short name reaches the upstream as it is. The
    # upstream has no repository `alpine`, and like Docker Hub (and Quay) it grants no token
    # for one: 401, which the mirror passes on as DENIED, never as the cached library/alpine.
    status, _, body = await get(http, f"{mirror.url}/v2/alpine/manifests/3.19?ns=quay.io")
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
    assert upstream.proxy.count(contains="/v2/alpine/manifests/3.19") >= 1
    assert fetched(upstream, contains="/v2/library/alpine/manifests/3.19") == 1


async def test_unknown_ns_is_name_unknown_and_dials_nobody(mirror, http, upstream):
    for url in ("/v2/library/alpine/manifests/3.19?ns=evil.example",
                "/v2/library/alpine/blobs/sha256:" + "a" * 64 + "?ns=127.0.0.1%3A1",
                "/v2/library/alpine/tags/list?ns=nowhere.test",
                "/nowhere/v2/library/alpine/manifests/3.19",
                "/nowhere/v2/"):
        status, headers, body = await get(http, mirror.url + url)
        assert status == 404, url
        assert json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
    assert upstream.proxy.requests == [] and upstream.tokens.requests == []


@pytest.mark.parametrize("path", [
    "/v2/library/alpine/manifests/3.19",
    "/v2/alpine/manifests/3.19",
    "/v2/hub/library/alpine/manifests/3.19",            # podman location = "m/hub"
    "/v2/docker.io/alpine/manifests/3.19",
    "/hub/v2/library/alpine/manifests/3.19",            # Docker >= 25 mirror "https://m/hub"
    "/hub/v2/library/alpine/manifests/3.19?ns=docker.io",
    "/v2/hub/library/alpine/manifests/3.19?ns=docker.io",  # containerd override_path
])
async def test_every_spelling_of_alpine_shares_one_cache_entry(mirror, http, upstream, path):
    alpine = upstream.images["library/alpine"]
    assert (await get(http, f"{mirror.url}/v2/alpine/manifests/3.19"))[2] == alpine.manifest
    upstream.proxy.reset()
    status, headers, body = await get(http, mirror.url + path)
    assert (status, body) == (200, alpine.manifest)
    assert upstream.proxy.requests == []


async def test_prefixed_ping_answers_for_configured_prefixes(mirror, http):
    for path in ("/v2/", "/hub/v2/", "/quay.io/v2/"):
        status, headers, body = await get(http, mirror.url + path)
        assert (status, body, headers["Content-Type"]) == (200, b"{}", "application/json")


async def collect_tags(http, base, url):
    pages, tags = [], []
    while url:
        status, headers, body = await get(http, base + url)
        assert status == 200
        page = json.loads(body)["tags"]
        pages.append(page)
        tags += page
        link = headers.get("Link")
        url = link[1:link.index(">")] if link else None
        if link:
            assert link.endswith('; rel="next"')
    return pages, tags


async def test_tag_list_paginates_with_links_that_keep_prefix_and_ns(mirror, http, upstream):
    expected = sorted(upstream.images["library/manytags"].tags)
    pages, tags = await collect_tags(http, mirror.url, "/v2/library/manytags/tags/list?n=10")
    assert tags == expected and [len(p) for p in pages] == [10, 10, 10, 3]
    status, headers, body = await get(http, f"{mirror.url}/hub/v2/manytags/tags/list?n=5&ns=docker.io")
    assert headers["Link"] == (f'</hub/v2/manytags/tags/list?n=5&last={expected[4]}'
                               '&ns=docker.io>; rel="next"')
    pages, tags = await collect_tags(http, mirror.url, "/hub/v2/manytags/tags/list?n=5&ns=docker.io")
    assert tags == expected
    # The whole list was fetched once and paginated locally.
    assert fetched(upstream, "GET", "/tags/list") == 1


async def test_tag_list_n_zero_last_and_bad_n(mirror, http, upstream):
    status, headers, body = await get(http, f"{mirror.url}/v2/library/manytags/tags/list?n=0")
    assert json.loads(body)["tags"] == [] and "Link" not in headers
    status, headers, body = await get(http, f"{mirror.url}/v2/library/manytags/tags/list?last=t28")
    assert json.loads(body)["tags"] == ["t29", "v1.0", "v2.0-rc1"] and "Link" not in headers
    status, headers, body = await get(http, f"{mirror.url}/v2/library/manytags/tags/list?n=-1")
    assert status == 400 and b"PAGINATION_NUMBER_INVALID" in body


async def test_tag_list_served_stale_when_upstream_down(start_mirror, http, upstream):
    mirror = await start_mirror(tag_ttl=0)
    url = f"{mirror.url}/v2/library/manytags/tags/list"
    first = await get(http, url)
    upstream.proxy.down()
    status, _, body = await get(http, url)
    assert (status, body) == (200, first[2])


async def test_catalog_lists_cached_repositories_as_clients_pull_them(mirror, http, upstream):
    await get(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    await get(http, f"{mirror.url}/v2/quay.io/team/app/manifests/2.0")
    status, headers, body = await get(http, f"{mirror.url}/v2/_catalog")
    assert json.loads(body) == {"repositories": ["library/alpine", "quay.io/team/app"]}
    status, headers, body = await get(http, f"{mirror.url}/v2/_catalog?n=1")
    assert json.loads(body) == {"repositories": ["library/alpine"]}
    assert headers["Link"] == '</v2/_catalog?n=1&last=library%2Falpine>; rel="next"'


async def test_referrers_404_passes_through_so_clients_fall_back(mirror, http, upstream):
    oci = upstream.images["library/ociimage"]
    status, _, body = await get(http, f"{mirror.url}/v2/library/ociimage/referrers/{oci.digest}")
    assert status == 404  # Distribution 2.8 has no referrers API
    assert fetched(upstream, "GET", f"/referrers/{oci.digest}") == 1
    status, _, body = await get(http, f"{mirror.url}/v2/library/ociimage/referrers/sha256:bad")
    assert status == 400 and b"DIGEST_INVALID" in body


@pytest.mark.parametrize("path, code", [
    ("/v2/Library/alpine/manifests/latest", "NAME_INVALID"),
    ("/v2/%2e%2e/alpine/manifests/latest", "NAME_INVALID"),
    ("/v2/a/%2e%2e/b/manifests/latest", "NAME_INVALID"),
    ("/v2/a%2Fb/manifests/latest", "NAME_INVALID"),
    ("/v2/" + "a" * 256 + "/manifests/latest", "NAME_INVALID"),
    ("/v2/alpine/manifests/sha256:totallywrong", "DIGEST_INVALID"),
    ("/v2/alpine/blobs/sha256:" + "A" * 64, "DIGEST_INVALID"),
    ("/v2/alpine/blobs/md5:abc", "DIGEST_INVALID"),
    ("/v2/alpine/tags/list?n=x", "PAGINATION_NUMBER_INVALID"),
])
async def test_hostile_input_is_400_and_goes_nowhere(mirror, http, upstream, path, code):
    status, headers, body = await get(http, mirror.url + path)
    assert status == 400
    assert json.loads(body)["errors"][0]["code"] == code
    assert headers["Content-Type"] == "application/json"
    assert upstream.proxy.requests == []
    assert not (mirror.root / "blobs" / "sha256").exists()


async def test_a_reference_that_is_no_tag_is_manifest_unknown_without_asking(mirror, http,
                                                                           upstream):
    for method in ("GET", "HEAD"):
        status, _, body = await get(http, f"{mirror.url}/v2/alpine/manifests/-notatag", method)
        assert status == 404
    assert json.loads((await get(http, f"{mirror.url}/v2/alpine/manifests/.x"))[2])[
        "errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert upstream.proxy.requests == []


@pytest.mark.parametrize("method, path, code", [
    ("PUT", "/hub/v2/library/alpine/manifests/latest", "UNSUPPORTED"),
    ("POST", "/quay.io/v2/team/app/blobs/uploads/", "UNSUPPORTED"),
    ("DELETE", "/hub/v2/library/alpine/blobs/sha256:" + "a" * 64, "UNSUPPORTED"),
    ("POST", "/v2/quay.io/team/app/blobs/uploads/", "DENIED"),
    ("PUT", "/v2/docker.io/library/alpine/manifests/latest", "DENIED"),
])
async def test_pushes_to_upstream_routed_names_are_refused(mirror, http, upstream, method, path,
                                                          code):
    status, headers, body = await get(http, mirror.url + path, method)
    assert json.loads(body)["errors"][0]["code"] == code
    assert status == {"UNSUPPORTED": 405, "DENIED": 403}[code]
    assert upstream.proxy.requests == []
    assert json.loads((await get(http, f"{mirror.url}/v2/_catalog"))[2])["repositories"] == []


async def test_plain_http_port_survives_a_tls_client_hello(mirror, http):
    """skopeo --tls-verify=false tries https first, on the plain-http port."""
    import asyncio
    import ssl
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", int(mirror.host.rsplit(":", 1)[1]), ssl=context), 5)
        writer.close()
    status, _, body = await get(http, f"{mirror.url}/v2/")
    assert (status, body) == (200, b"{}")


@pytest.mark.parametrize("path", [
    "/v2/example.com/foo/manifests/1.0",
    "/v2/example.com/foo/blobs/sha256:" + "b" * 64,
    "/v2/example.com/foo/tags/list",
    "/v2/registry.example.org/team/app/manifests/latest",
])
async def test_unconfigured_registry_host_in_the_name_is_a_quick_404_not_docker_hub(
        mirror, http, upstream, path):
    # podman `location = "m/example.com"` for a registry the mirror has no upstream for:
    # no Docker Hub namespace has a dot, so the default upstream is not asked (it would
    # only answer its 401 for a missing repository, after a token round trip).
    status, _, body = await get(http, mirror.url + path)
    [error] = json.loads(body)["errors"]
    assert (status, error["code"]) == (404, "NAME_UNKNOWN")
    host = path.split("/")[2]
    assert error["message"].startswith(f"no upstream is configured for '{host}', and ")
    assert "configured: docker.io, hub, quay, quay.io" in error["message"]
    assert upstream.proxy.requests == [] and upstream.tokens.requests == []


async def test_a_first_component_without_a_dot_still_goes_to_the_default_upstream(
        mirror, http, upstream):
    status, _, body = await get(http, f"{mirror.url}/v2/team/app/manifests/2.0")
    assert (status, body) == (200, upstream.images["team/app"].manifest)
    assert fetched(upstream, "GET", "/v2/team/app/manifests/2.0") == 1


async def test_a_dotted_name_can_still_be_pushed_and_pulled_back(mirror, http, upstream):
    from tests.test_push import push_image

    digest, manifest = await push_image(http, mirror, "example.com/foo", "1.0", b"dotted")
    status, headers, body = await get(http, f"{mirror.url}/v2/example.com/foo/manifests/1.0")
    assert (status, body, headers["Docker-Content-Digest"]) == (200, manifest, digest)
    assert upstream.proxy.requests == []


async def test_a_dotted_name_goes_to_a_default_upstream_that_is_not_docker_hub(
        start_mirror, http, upstream):
    from mirror import config as cfg

    mirror = await start_mirror(upstreams=(
        cfg.Upstream("registry.corp", upstream.url, default=True, library=False),))
    status, _, body = await get(http, f"{mirror.url}/v2/example.com/foo/manifests/1.0")
    # Distribution allows dots anywhere: the name was asked for there (its token server,
    # like Docker Hub's, grants nothing on a repository that does not exist).
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
    assert upstream.proxy.count(contains="/v2/example.com/foo/manifests/1.0") >= 1


async def test_a_registry_without_upstreams_hosts_pushes_and_answers_other_names_at_once(
        start_mirror, http, upstream):
    from tests.test_push import push_image

    mirror = await start_mirror(upstreams=())  # upstreams = [] in the config file
    for path, message in [
        ("/v2/alpine/manifests/3.19", "repository alpine is not known to this registry (it "
                                      "has no upstreams: hosted repositories only)"),
        ("/v2/team/app/blobs/sha256:" + "c" * 64, "repository team/app is not known to this "
                                                  "registry (it has no upstreams: hosted "
                                                  "repositories only)"),
        ("/v2/alpine/manifests/3.19?ns=docker.io", "no upstream is configured for "
                                                   "ns='docker.io'"),
        ("/hub/v2/alpine/manifests/3.19", "no upstream is configured for prefix 'hub'"),
    ]:
        status, _, body = await get(http, mirror.url + path)
        [error] = json.loads(body)["errors"]
        assert (status, error["code"], error["message"]) == (404, "NAME_UNKNOWN", message), path
    # With no upstream to shadow, library/ is free to push to; it is then served from here.
    digest, manifest = await push_image(http, mirror, "library/hello", "1", b"no upstreams")
    status, headers, body = await get(http, f"{mirror.url}/v2/library/hello/manifests/1")
    assert (status, body) == (200, manifest)
    status, _, body = await get(http, f"{mirror.url}/v2/_catalog")
    assert json.loads(body) == {"repositories": ["library/hello"]}
    assert upstream.proxy.requests == [] and upstream.tokens.requests == []
