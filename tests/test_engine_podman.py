"""Real podman (4.3, vfs storage, root) pulls through the mirror and pushes to it.

podman reads the `[[registry]]` / `[[registry.mirror]]` blocks of docs/clients.md as they
are written there, with only the mirror's host:port put in: `docker.io` is mirrored at
`host:port/docker.io` (the path-prefix form) and its own location, `registry-1.docker.io`,
is reached only through a proxy on a closed loopback port, so a pull that fell back from
the mirror fails instead of leaving the machine. What podman stored is read back with
`podman image inspect` and from the vfs layer directories: the manifest digest, the image
ID (the config's digest), the diff IDs and the unpacked files. Hosted names are pushed to
`host:port/team/...` directly, with `--tls-verify=false` (plain HTTP on loopback).
"""

from __future__ import annotations

import base64
import gzip
import json

import pytest

from mirror import config as cfg
from mirror.api.htpasswd import add_user
from tests.conftest import sha256
from tests.support import missing
from tests.support.images import Image, MiB, random_bytes, small_image
from tests.support.podman import Podman, registries_conf_from_docs, unavailable
from tests.support.registry import free_port
from tests.test_seed_workflow import write_dir

ALPINE = "docker.io/library/alpine:3.19"


@pytest.fixture
def podman(tmp_path):
    """podman(host) → a Podman of its own (a fresh node) whose mirror is at `host`."""
    reason = unavailable()
    if reason:
        missing(reason)
    made: list[Podman] = []

    def make(host: str) -> Podman:
        made.append(Podman(tmp_path / f"podman{len(made)}", registries_conf_from_docs(host)))
        return made[-1]

    yield make
    left = [point for engine in made for point in engine.close()]
    assert left == [], f"podman left mounts behind: {left}"


def calls(seen) -> set[tuple[str, str, int]]:
    return {(s.method, s.path, s.status) for s in seen}


def diff_ids(image: Image) -> list[str]:
    return json.loads(image.blobs[image.config_digest])["rootfs"]["diff_ids"]


async def assert_stored(engine: Podman, reference: str, image: Image) -> dict:
    """podman holds `image` under `reference`: its digest, ID, diff IDs."""
    stored = await engine.inspect(reference)
    assert stored["Digest"] == image.digest
    assert "sha256:" + stored["Id"] == image.config_digest
    assert stored["RootFS"]["Layers"] == diff_ids(image)
    return stored


def upstream_fetches(upstream) -> list[tuple[str, str]]:
    """What the mirror fetched upstream (answers with content, not auth challenges)."""
    return sorted((r.method, r.path) for r in upstream.proxy.records if r.status != 401)


def alpine_fetches(alpine: Image, reference: str) -> list[tuple[str, str]]:
    """One GET of the manifest and one of each blob: what a cold mirror fetches for alpine."""
    return sorted([("GET", f"/v2/library/alpine/manifests/{reference}")]
                  + [("GET", f"/v2/library/alpine/blobs/{digest}") for digest in alpine.blobs])


async def test_podman_pulls_docker_io_through_the_mirror_and_again_after_rmi_from_its_cache(
        podman, logged_mirror, upstream):
    alpine = upstream.images["library/alpine"]
    host, seen, _ = await logged_mirror()
    engine = podman(host)

    (await engine.run("pull", ALPINE)).check()
    stored = await assert_stored(engine, ALPINE, alpine)
    assert stored["RepoDigests"] == [f"docker.io/library/alpine@{alpine.digest}"]
    # vfs unpacked the layers made by tests/support/images.py: each layer directory is a
    # whole root filesystem, so the first layer's file is in both, the payload in the top.
    assert engine.layer_files("etc/alpine-release") == [b"3.19.0\n"] * 2
    assert engine.layer_files("opt/payload.bin") == [random_bytes(3 * MiB, "alpine-payload")]
    # The blob-info cache went to the private /var/lib, not the host's.
    assert (engine.directory / "var-lib/containers/cache/blob-info-cache-v1.boltdb").is_file()
    answered = calls(seen)
    assert ("GET", "/v2/", 200) in answered  # the ping goes to the host root, not the prefix
    assert ("GET", "/v2/docker.io/library/alpine/manifests/3.19", 200) in answered
    assert not any(s.method == "HEAD" for s in seen)  # containers/image GETs manifests
    for digest in alpine.blobs:
        assert ("GET", f"/v2/docker.io/library/alpine/blobs/{digest}", 200) in answered
    assert upstream_fetches(upstream) == alpine_fetches(alpine, "3.19")

    (await engine.run("rmi", ALPINE)).check()
    assert await engine.images() == [] and engine.layer_files("etc/alpine-release") == []
    upstream.proxy.reset()
    upstream.tokens.reset()
    seen.clear()
    (await engine.run("pull", ALPINE)).check()
    await assert_stored(engine, ALPINE, alpine)
    assert engine.layer_files("opt/payload.bin") == [random_bytes(3 * MiB, "alpine-payload")]
    answered = calls(seen)
    # podman GETs the tag and every blob again; the mirror answers all of it from its cache.
    assert ("GET", "/v2/docker.io/library/alpine/manifests/3.19", 200) in answered
    for digest in alpine.blobs:
        assert ("GET", f"/v2/docker.io/library/alpine/blobs/{digest}", 200) in answered
    assert upstream.proxy.records == [] and upstream.tokens.requests == []


async def test_podman_pulls_by_digest_through_the_mirror(podman, logged_mirror, upstream):
    alpine = upstream.images["library/alpine"]
    host, seen, _ = await logged_mirror()
    engine = podman(host)
    reference = f"docker.io/library/alpine@{alpine.digest}"

    (await engine.run("pull", reference)).check()
    stored = await assert_stored(engine, reference, alpine)
    assert stored["RepoDigests"] == [reference] and stored["RepoTags"] == []
    assert engine.layer_files("etc/alpine-release") == [b"3.19.0\n"] * 2
    assert ("GET", f"/v2/docker.io/library/alpine/manifests/{alpine.digest}", 200) in calls(seen)
    assert upstream_fetches(upstream) == alpine_fetches(alpine, alpine.digest)


async def test_podman_pushes_a_hosted_name_lists_it_and_pulls_it_back(
        podman, logged_mirror, upstream, http, tmp_path):
    image = small_image("team/newhello", ["latest"], "podman-push", size=200_000)
    write_dir(image, tmp_path / "source")
    host, seen, _ = await logged_mirror()
    engine = podman(host)
    target = f"{host}/team/newhello:latest"
    # The image comes into podman's store from a directory, not from the mirror.
    (await engine.run("pull", f"dir:{tmp_path / 'source'}")).check()
    (await engine.run("tag", image.config_digest.removeprefix("sha256:"), target)).check()

    (await engine.run("push", "--tls-verify=false", "--digestfile", str(tmp_path / "digest"),
                      target)).check()
    pushed = (tmp_path / "digest").read_text()
    async with http.get(f"http://{host}/v2/_catalog") as resp:
        assert await resp.json() == {"repositories": ["team/newhello"]}
    async with http.get(f"http://{host}/v2/team/newhello/manifests/latest") as resp:
        manifest = await resp.read()
    assert sha256(manifest) == pushed
    document = json.loads(manifest)
    assert document["config"]["digest"] == image.config_digest
    # podman compressed the layer again (its gzip, not Python's): the digest is new, the
    # tar inside is the same.
    (layer,) = document["layers"]
    async with http.get(f"http://{host}/v2/team/newhello/blobs/{layer['digest']}") as resp:
        blob = await resp.read()
    assert sha256(blob) == layer["digest"] and sha256(gzip.decompress(blob)) == diff_ids(image)[0]
    assert ("POST", "/v2/team/newhello/blobs/uploads/", 202) in calls(seen)
    assert ("PUT", "/v2/team/newhello/manifests/latest", 201) in calls(seen)

    (await engine.run("rmi", "--all")).check()
    assert await engine.images() == [] and engine.layer_files("data.bin") == []
    seen.clear()
    (await engine.run("pull", "--tls-verify=false", target)).check()
    stored = await engine.inspect(target)
    assert stored["Digest"] == pushed and "sha256:" + stored["Id"] == image.config_digest
    assert stored["RootFS"]["Layers"] == diff_ids(image)
    assert engine.layer_files("data.bin") == [random_bytes(200_000, "team/newhello/podman-push")]
    assert ("GET", f"/v2/team/newhello/blobs/{layer['digest']}", 200) in calls(seen)
    # A hosted name is never asked about upstream, neither on push nor on pull.
    assert upstream.proxy.records == [] and upstream.tokens.requests == []


async def test_podman_pulls_anonymously_from_a_mirror_with_logins_and_pushes_after_login(
        podman, logged_mirror, upstream, http, tmp_path):
    alpine = upstream.images["library/alpine"]
    htpasswd = tmp_path / "htpasswd"
    add_user(htpasswd, "alice", "wonder")  # what `mirror user add alice` writes
    host, seen, _ = await logged_mirror(access=cfg.Access(htpasswd=str(htpasswd)))
    engine = podman(host)
    target = f"{host}/team/signedin:1"

    # No credentials anywhere: the ping is challenged (401, Basic), podman goes on without
    # a login, and anonymous_pull (the default) lets it have the image.
    (await engine.run("pull", ALPINE)).check()
    await assert_stored(engine, ALPINE, alpine)
    assert json.loads(engine.auth_file.read_text()) == {"auths": {}}
    answered = calls(seen)
    assert ("GET", "/v2/", 401) in answered
    assert ("GET", "/v2/docker.io/library/alpine/manifests/3.19", 200) in answered
    assert upstream_fetches(upstream) == alpine_fetches(alpine, "3.19")

    upstream.proxy.reset()
    upstream.tokens.reset()
    (await engine.run("tag", ALPINE, target)).check()
    refused = await engine.run("push", "--tls-verify=false", target)
    assert refused.returncode == 125
    assert refused.stderr.splitlines()[-1] == (
        f"Error: writing blob: initiating layer upload to /v2/team/signedin/blobs/uploads/ "
        f"in {host}: unauthorized: log in to push to this registry")
    assert ("POST", "/v2/team/signedin/blobs/uploads/", 401) in calls(seen)

    login = (await engine.run("login", "--tls-verify=false", "-u", "alice",
                              "--password-stdin", host, stdin=b"wonder\n")).check()
    assert login.stdout == "Login Succeeded!\n"
    assert json.loads(engine.auth_file.read_text()) == {
        "auths": {host: {"auth": base64.b64encode(b"alice:wonder").decode()}}}
    (await engine.run("push", "--tls-verify=false", "--digestfile", str(tmp_path / "digest"),
                      target)).check()
    async with http.get(f"http://{host}/v2/_catalog") as resp:
        assert await resp.json() == {"repositories": ["library/alpine", "team/signedin"]}
    async with http.get(f"http://{host}/v2/team/signedin/manifests/1") as resp:
        manifest = await resp.read()
    assert sha256(manifest) == (tmp_path / "digest").read_text()
    assert json.loads(manifest)["config"]["digest"] == alpine.config_digest
    assert upstream.proxy.records == [] and upstream.tokens.requests == []


async def test_podman_falls_back_from_a_dead_mirror_to_the_registry_only_on_loopback(podman):
    """The doc's `location = "registry-1.docker.io"` is where podman goes when the mirror
    fails; here that goes to the closed proxy port, so it fails too and nothing leaves."""
    host = f"127.0.0.1:{free_port()}"
    engine = podman(host)

    failed = await engine.run("pull", ALPINE)
    assert failed.returncode == 125
    proxy = engine.proxy.removeprefix("http://")
    assert failed.stderr.splitlines()[-1] == (
        "Error: initializing source docker://alpine:3.19: (Mirrors also failed: "
        f"[{host}/docker.io/library/alpine:3.19: pinging container registry {host}: "
        f'Get "http://{host}/v2/": dial tcp {host}: connect: connection refused]): '
        "registry-1.docker.io/library/alpine:3.19: pinging container registry "
        'registry-1.docker.io: Get "https://registry-1.docker.io/v2/": proxyconnect tcp: '
        f"dial tcp {proxy}: connect: connection refused")
    assert await engine.images() == []
