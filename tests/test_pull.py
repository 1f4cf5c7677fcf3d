"""skopeo pulls real images through the mirror: digests equal the upstream's, warm pulls are
free, and a tag or repository the upstream lacks is named as such."""

import asyncio
import json

from tests.conftest import fetched, skopeo_copy


async def test_skopeo_pulls_by_bare_name_with_the_upstreams_digests(mirror, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    got = await skopeo_copy(f"{mirror.host}/alpine:3.19", tmp_path / "pull")
    assert got["manifest"] == alpine.manifest and got["digest"] == alpine.digest
    assert got["blobs"].keys() >= alpine.blobs.keys()
    for digest, data in alpine.blobs.items():
        assert got["blobs"][digest] == data
    # Each blob came from upstream exactly once.
    for digest in alpine.blobs:
        assert fetched(upstream, "GET", digest) == 1


async def test_second_pull_makes_no_upstream_request(mirror, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    await skopeo_copy(f"{mirror.host}/alpine:3.19", tmp_path / "first")
    upstream.proxy.reset()
    upstream.tokens.reset()
    got = await skopeo_copy(f"{mirror.host}/alpine:3.19", tmp_path / "second")
    assert got["digest"] == alpine.digest
    assert upstream.proxy.requests == []  # no blob, no manifest: the tag is within its TTL
    assert upstream.tokens.requests == []


async def test_skopeo_pulls_by_prefix_and_by_digest(mirror, upstream, tmp_path):
    app = upstream.images["team/app"]
    got = await skopeo_copy(f"{mirror.host}/quay.io/team/app:2.0", tmp_path / "prefix")
    assert got["digest"] == app.digest
    # The prefix picked the upstream and was stripped before the request went there.
    assert fetched(upstream, "GET", "/v2/team/app/manifests/2.0") == 1
    assert upstream.proxy.count(contains="quay") == 0

    oci = upstream.images["library/ociimage"]
    got = await skopeo_copy(f"{mirror.host}/library/ociimage@{oci.digest}", tmp_path / "digest")
    assert got["manifest"] == oci.manifest
    assert all(got["blobs"][d] == data for d, data in oci.blobs.items())


async def test_multi_arch_index_pulls_whole_and_per_platform(mirror, upstream, tmp_path):
    index = upstream.images["library/multiarch"]
    got = await skopeo_copy(f"{mirror.host}/multiarch:latest", tmp_path / "all", "--all")
    assert got["manifest"] == index.manifest
    arm64 = next(c for c in index.children if c.platform["architecture"] == "arm64")
    got = await skopeo_copy(f"{mirror.host}/multiarch:latest", tmp_path / "arm", arch="arm64")
    assert got["manifest"] == arm64.manifest
    assert all(got["blobs"][d] == data for d, data in arm64.blobs.items())


async def skopeo_fails(reference: str, dest) -> str:
    """skopeo copy that must fail; what it printed."""
    proc = await asyncio.create_subprocess_exec(
        "skopeo", "copy", "--src-tls-verify=false", "--retry-times=0",
        f"docker://{reference}", f"dir:{dest}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    return err.decode()


async def test_missing_tag_of_an_existing_repository_says_the_tag_is_unknown(
        mirror, upstream, http, tmp_path):
    # The upstream (Distribution behind a token server, as Docker Hub) has team/app:2.0 and
    # no 9.9: it grants the pull token and answers 404 MANIFEST_UNKNOWN.
    url = f"{mirror.url}/v2/quay.io/team/app/manifests/9.9"
    async with http.get(url) as resp:
        assert resp.status == 404
        [error] = json.loads(await resp.read())["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert error["message"] == ("tag team/app:9.9 is not known to upstream quay.io "
                                "(it answered 404 MANIFEST_UNKNOWN)")
    assert fetched(upstream, "GET", "/v2/team/app/manifests/9.9") == 1
    # Docker's HEAD gets no body from the upstream: the request alone names the tag.
    async with http.head(f"{mirror.url}/v2/quay.io/team/app/manifests/9.8") as resp:
        assert resp.status == 404
    async with http.get(f"{mirror.url}/v2/quay.io/team/app/manifests/9.8") as resp:
        message = json.loads(await resp.read())["errors"][0]["message"]
    assert message.startswith("tag team/app:9.8 is not known to upstream quay.io")
    # And a real client prints it.
    err = await skopeo_fails(f"{mirror.host}/quay.io/team/app:9.7", tmp_path / "pull")
    assert "tag team/app:9.7 is not known to upstream quay.io" in err, err


async def test_missing_repository_is_denied_naming_both_possibilities(mirror, upstream, http):
    # Docker Hub (and this upstream's token server) answers 401 for a repository that does
    # not exist, never 404: the mirror cannot tell it from a private one, and says so.
    async with http.get(f"{mirror.url}/v2/quay.io/team/nothing/manifests/1.0") as resp:
        assert resp.status == 403
        [error] = json.loads(await resp.read())["errors"]
    assert error["code"] == "DENIED"
    assert error["message"] == (
        "upstream quay.io refused access to team/nothing: it has no such repository (Docker "
        "Hub answers 401 for those), or it is private: then set username and password for "
        "upstream quay.io")
    assert upstream.tokens.requests  # it asked for a token, which granted nothing
    assert fetched(upstream, "GET", "/v2/team/nothing/manifests/1.0") == 0
