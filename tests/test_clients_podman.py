"""podman, CRI-O and skopeo pull through the mirror as a `[[registry.mirror]]` in registries.conf.

All three read `registries.conf` through containers/image; skopeo is the one installed here,
so it stands for them. The file is handed over with `--registries-conf`, the
`[[registry]]` blocks are the ones docs/clients.md gives, and skopeo gets no TLS flag of its
own: `insecure = true` in the file is what allows plain HTTP. These clients address the
mirror with a path prefix (`location = "host:port/hub"`) and ping `/v2/` at the host root.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from mirror import config as cfg
from tests.conftest import fetched, sha256
from tests.support.registry import free_port


def registries_conf(path: Path, *registries: tuple[str, str, str, str]) -> Path:
    """(prefix, location, mirror location, extra mirror TOML) → a registries.conf (v2)."""
    text = "unqualified-search-registries = []\n"
    for prefix, location, mirror, extra in registries:
        text += (f'\n[[registry]]\nprefix = "{prefix}"\nlocation = "{location}"\ninsecure = true\n'
                 f'\n[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n{extra}\n')
    path.write_text(text)
    return path


async def pull(conf: Path, reference: str, dest: Path) -> dict:
    """skopeo copy docker://reference dir:dest with `conf` as the only registries.conf."""
    # skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF (podman honours it); its hidden global
    # flag does the same. No auth file: a developer's credentials must not change the result.
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(conf.parent / "no-auth.json")}
    proc = await asyncio.create_subprocess_exec(
        "skopeo", "--registries-conf", str(conf), "copy", "--retry-times=0",
        f"docker://{reference}", f"dir:{dest}", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"skopeo copy {reference} took more than 60 s") from None
    assert proc.returncode == 0, f"skopeo failed: {err.decode()}"
    manifest = (dest / "manifest.json").read_bytes()
    blobs = {sha256(p.read_bytes()): p.read_bytes() for p in dest.iterdir() if len(p.name) == 64}
    return {"manifest": manifest, "digest": sha256(manifest), "blobs": blobs}


def assert_same(got: dict, image) -> None:
    assert got["manifest"] == image.manifest and got["digest"] == image.digest
    for digest, data in image.blobs.items():
        assert got["blobs"].get(digest) == data, digest


def stored_blobs(root: Path) -> dict[str, bytes]:
    """The blobs the mirror committed to disk (`<root>/blobs/sha256/ab/ab12...`), by digest."""
    return {f"sha256:{p.name}": p.read_bytes() for p in (root / "blobs").rglob("*") if p.is_file()}


def dead() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("prefix", ["hub", "docker.io"])
async def test_skopeo_pulls_docker_io_through_a_mirror_location_with_a_path_prefix(
        logged_mirror, upstream, tmp_path, prefix):
    alpine = upstream.images["library/alpine"]
    host, seen, _ = await logged_mirror()
    # The registry's own location is dead: only the mirror can serve this pull.
    conf = registries_conf(tmp_path / "registries.conf",
                           ("docker.io", dead(), f"{host}/{prefix}", ""))

    got = await pull(conf, "docker.io/library/alpine:3.19", tmp_path / "first")
    assert_same(got, alpine)
    calls = {(s.method, s.path, s.status) for s in seen}
    assert ("GET", "/v2/", 200) in calls  # the ping goes to the host root, not the prefix
    assert ("GET", f"/v2/{prefix}/library/alpine/manifests/3.19", 200) in calls
    assert not any(s.method == "HEAD" for s in seen)  # containers/image never HEADs manifests
    for digest in alpine.blobs:
        assert ("GET", f"/v2/{prefix}/library/alpine/blobs/{digest}", 200) in calls
        assert fetched(upstream, "GET", f"/v2/library/alpine/blobs/{digest}") == 1

    # skopeo GETs the tag every time: within the TTL the mirror answers it from cache.
    upstream.proxy.reset()
    upstream.tokens.reset()
    seen.clear()
    assert_same(await pull(conf, "docker.io/library/alpine:3.19", tmp_path / "again"), alpine)
    assert ("GET", f"/v2/{prefix}/library/alpine/manifests/3.19", 200) in {
        (s.method, s.path, s.status) for s in seen}
    assert upstream.proxy.requests == [] and upstream.tokens.requests == []


async def test_skopeo_pulls_quay_io_through_its_own_prefix(logged_mirror, upstream, tmp_path):
    """The prefix picks the upstream: docker.io's is dead here, so only quay.io can answer."""
    app = upstream.images["team/app"]
    host, seen, _ = await logged_mirror(upstreams=(
        cfg.Upstream("docker.io", f"http://{dead()}", default=True),
        cfg.Upstream("quay.io", upstream.url),
    ))
    conf = registries_conf(tmp_path / "registries.conf",
                           ("docker.io", dead(), f"{host}/docker.io", ""),
                           ("quay.io", dead(), f"{host}/quay.io", ""))

    assert_same(await pull(conf, "quay.io/team/app:2.0", tmp_path / "app"), app)
    assert ("GET", "/v2/quay.io/team/app/manifests/2.0", 200) in {
        (s.method, s.path, s.status) for s in seen}
    assert fetched(upstream, "GET", "/v2/team/app/manifests/2.0") == 1
    assert upstream.proxy.count(contains="quay") == 0  # the prefix never reaches upstream


async def test_digest_only_mirror_serves_digests_and_leaves_tags_to_the_registry(
        logged_mirror, upstream, tmp_path):
    """`pull-from-mirror = "digest-only"`: a tag (which may move) is always resolved at the
    registry itself; a digest (immutable) comes from the mirror."""
    oci = upstream.images["library/ociimage"]
    host, seen, root = await logged_mirror()
    registry = upstream.url.removeprefix("http://")
    conf = registries_conf(tmp_path / "registries.conf", (
        "docker.io", registry, f"{host}/hub", 'pull-from-mirror = "digest-only"'))

    by_tag = await pull(conf, "docker.io/library/ociimage:1.0", tmp_path / "tag")
    assert_same(by_tag, oci)
    assert seen == []  # the mirror was never asked, not even pinged
    assert stored_blobs(root) == {}
    assert fetched(upstream, "GET", "/v2/library/ociimage/manifests/1.0") == 1  # skopeo itself

    upstream.proxy.reset()
    by_digest = await pull(conf, f"docker.io/library/ociimage@{oci.digest}", tmp_path / "digest")
    assert_same(by_digest, oci)
    calls = {(s.method, s.path, s.status) for s in seen}
    assert ("GET", f"/v2/hub/library/ociimage/manifests/{oci.digest}", 200) in calls
    for digest in oci.blobs:
        assert ("GET", f"/v2/hub/library/ociimage/blobs/{digest}", 200) in calls
        # The mirror fetched it once and stored it.
        assert fetched(upstream, "GET", f"/v2/library/ociimage/blobs/{digest}") == 1
        assert stored_blobs(root)[digest] == oci.blobs[digest]
    assert json.loads(by_digest["manifest"])["mediaType"] == oci.media_type
