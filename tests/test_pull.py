"""skopeo pulls real images through the mirror: digests equal the upstream's, warm pulls are free."""

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
