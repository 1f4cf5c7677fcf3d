"""containerd pulls through the mirror with `ctr` and `hosts.toml`, as Kubernetes nodes do.

A private containerd (tests/support/containerd.py) reads the same `hosts.toml` files that
docs/clients.md tells users to put in `/etc/containerd/certs.d/<registry>/`. Unless a test
is about falling back, `server` is a dead port, so a pull can only succeed through the
mirror. Each pull uses a fresh containerd namespace, whose content store starts empty, so
every byte containerd holds afterwards came over the wire in that pull.
"""

from __future__ import annotations

import ssl
import uuid

import pytest

from mirror import config as cfg
from mirror.ops.certs import make_ca_and_server_cert
from tests.conftest import fetched, mirror_config
from tests.support.containerd import logged_app, write_hosts
from tests.support.registry import free_port


@pytest.fixture
def namespace():
    """A fresh containerd namespace: its own images and content, nothing pulled yet."""
    return lambda: f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def logged_mirror(tmp_path, upstream, aiohttp_server):
    """Start mirrors that log what they answer: (server, log, url); over TLS with `tls`.
    (conftest's logged_mirror answers host:port; containerd's hosts.toml wants the URL.)"""
    roots: list = []

    async def start(upstreams=None, tls: ssl.SSLContext | None = None):
        overrides = {"upstreams": upstreams} if upstreams else {}
        root = tmp_path / f"data{len(roots)}"
        roots.append(root)
        app, seen = logged_app(mirror_config(root, upstream.url, **overrides))
        server = await aiohttp_server(app, ssl=tls)
        scheme = "https" if tls else "http"
        return server, seen, f"{scheme}://127.0.0.1:{server.port}"

    return start


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


async def assert_holds(containerd, ns: str, reference: str, image) -> None:
    """containerd recorded `image` as `reference` and holds its manifest and blobs byte-exact."""
    assert await containerd.image_digest(ns, reference) == image.digest
    assert await containerd.content(ns, image.digest) == image.manifest
    for digest, data in image.blobs.items():
        assert await containerd.content(ns, digest) == data, digest


async def test_ctr_pulls_docker_io_by_tag_with_ns_and_a_second_pull_is_served_from_cache(
        containerd, namespace, logged_mirror, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    _, seen, url = await logged_mirror()
    hosts = tmp_path / "certs.d"
    write_hosts(hosts, "docker.io", dead_url(), [(url, "")])

    ns = namespace()
    (await containerd.pull(ns, "docker.io/library/alpine:3.19", hosts)).check()
    await assert_holds(containerd, ns, "docker.io/library/alpine:3.19", alpine)

    # containerd's shape (PROTOCOL.md): no /v2/ ping, ?ns=docker.io on every request, the
    # tag resolved with HEAD and one comma-joined Accept ending in */*.
    assert seen and all(s.path.endswith("?ns=docker.io") for s in seen), seen
    assert not any(s.path.startswith("/v2/?") or s.path == "/v2/" for s in seen)
    resolve = seen[0]
    assert (resolve.method, resolve.path, resolve.status) == (
        "HEAD", "/v2/library/alpine/manifests/3.19?ns=docker.io", 200)
    assert len(resolve.accept) == 1 and resolve.accept[0].endswith("*/*")
    for digest in alpine.blobs:
        assert fetched(upstream, "GET", f"/blobs/{digest}") == 1

    # A second node (a fresh namespace: empty content store) costs the upstream nothing.
    upstream.proxy.reset()
    upstream.tokens.reset()
    seen.clear()
    ns = namespace()
    (await containerd.pull(ns, "docker.io/library/alpine:3.19", hosts)).check()
    await assert_holds(containerd, ns, "docker.io/library/alpine:3.19", alpine)
    assert upstream.proxy.requests == [] and upstream.tokens.requests == []
    served = {s.path.split("/blobs/")[1].partition("?")[0] for s in seen
              if s.method == "GET" and "/blobs/" in s.path and s.status == 200}
    assert served == set(alpine.blobs)  # every blob came from the mirror's disk


async def test_ctr_pulls_a_multi_arch_index_by_digest_for_one_platform(
        containerd, namespace, logged_mirror, upstream, tmp_path):
    index = upstream.images["library/multiarch"]
    arm64 = next(c for c in index.children if c.platform["architecture"] == "arm64")
    amd64 = next(c for c in index.children if c.platform["architecture"] == "amd64")
    _, seen, url = await logged_mirror()
    hosts = tmp_path / "certs.d"
    write_hosts(hosts, "docker.io", dead_url(), [(url, "")])

    ns = namespace()
    reference = f"docker.io/library/multiarch@{index.digest}"
    (await containerd.pull(ns, reference, hosts, platform="linux/arm64")).check()
    assert await containerd.image_digest(ns, reference) == index.digest
    assert await containerd.content(ns, index.digest) == index.manifest
    assert await containerd.content(ns, arm64.digest) == arm64.manifest
    for digest, data in arm64.blobs.items():
        assert await containerd.content(ns, digest) == data
    assert f"/v2/library/multiarch/manifests/{index.digest}?ns=docker.io" in {
        s.path for s in seen}
    # Only the arm64 child was fetched, through the mirror and from the upstream.
    assert not any(d in s.path for s in seen for d in [amd64.digest, *amd64.layer_digests])
    assert fetched(upstream, contains=amd64.digest) == 0
    for digest in arm64.layer_digests:
        assert fetched(upstream, "GET", digest) == 1


async def test_ctr_pulls_a_second_upstream_routed_by_ns(
        containerd, namespace, logged_mirror, upstream, tmp_path):
    """quay.io/hosts.toml → the mirror gets ?ns=quay.io and must use its quay.io upstream:
    the default (docker.io) upstream is dead here, so only ns routing can succeed."""
    app = upstream.images["team/app"]
    _, seen, url = await logged_mirror(upstreams=(
        cfg.Upstream("docker.io", dead_url(), default=True),
        cfg.Upstream("quay.io", upstream.url),
    ))
    hosts = tmp_path / "certs.d"
    write_hosts(hosts, "quay.io", dead_url(), [(url, "")])

    ns = namespace()
    (await containerd.pull(ns, "quay.io/team/app:2.0", hosts)).check()
    await assert_holds(containerd, ns, "quay.io/team/app:2.0", app)
    assert seen and all(s.path.endswith("?ns=quay.io") for s in seen), seen
    assert fetched(upstream, "GET", "/v2/team/app/manifests/") >= 1


@pytest.mark.parametrize("path, extra, resolved", [
    # Docker 29 / containerd host with a path: containerd appends /v2 after it.
    ("/hub", "", "/hub/v2/team/app/manifests/2.0?ns=docker.io"),
    # override_path: the host URL is the whole API root.
    ("/v2/hub", "override_path = true", "/v2/hub/team/app/manifests/2.0?ns=docker.io"),
])
async def test_ctr_pulls_through_a_mirror_url_with_a_path(
        containerd, namespace, logged_mirror, upstream, tmp_path, path, extra, resolved):
    app = upstream.images["team/app"]
    _, seen, url = await logged_mirror()
    hosts = tmp_path / "certs.d"
    write_hosts(hosts, "docker.io", dead_url(), [(url + path, extra)])

    ns = namespace()
    (await containerd.pull(ns, "docker.io/team/app:2.0", hosts)).check()
    await assert_holds(containerd, ns, "docker.io/team/app:2.0", app)
    assert ("HEAD", resolved, 200) in {(s.method, s.path, s.status) for s in seen}, seen
    prefix = resolved.split("team/app")[0]
    assert all(s.path.startswith(prefix) for s in seen), seen
    for digest in app.blobs:
        assert fetched(upstream, "GET", f"/v2/team/app/blobs/{digest}") == 1


async def test_ctr_pulls_over_https_with_the_ca_named_in_hosts_toml(
        containerd, namespace, logged_mirror, upstream, tmp_path):
    oci = upstream.images["library/ociimage"]
    ca, cert, key = make_ca_and_server_cert(tmp_path, ["127.0.0.1"])
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    _, seen, url = await logged_mirror(tls=tls)
    assert url.startswith("https://")

    # Without the CA, containerd does not trust the mirror: no request reaches it.
    untrusting = tmp_path / "no-ca"
    write_hosts(untrusting, "docker.io", dead_url(), [(url, "")])
    failed = await containerd.pull(namespace(), "docker.io/library/ociimage:1.0", untrusting)
    assert failed.returncode != 0 and seen == []

    trusting = tmp_path / "certs.d"
    write_hosts(trusting, "docker.io", dead_url(), [(url, f'ca = "{ca}"')])
    ns = namespace()
    (await containerd.pull(ns, "docker.io/library/ociimage:1.0", trusting)).check()
    await assert_holds(containerd, ns, "docker.io/library/ociimage:1.0", oci)
    assert ("HEAD", "/v2/library/ociimage/manifests/1.0?ns=docker.io", 200) in {
        (s.method, s.path, s.status) for s in seen}


async def test_ctr_falls_through_a_mirror_that_is_down_to_the_next_host(
        containerd, namespace, logged_mirror, upstream, tmp_path):
    app = upstream.images["team/app"]
    _, seen, url = await logged_mirror()
    hosts = tmp_path / "certs.d"
    write_hosts(hosts, "docker.io", dead_url(), [(dead_url(), ""), (url, "")])

    ns = namespace()
    (await containerd.pull(ns, "docker.io/team/app:2.0", hosts)).check()
    await assert_holds(containerd, ns, "docker.io/team/app:2.0", app)
    assert ("HEAD", "/v2/team/app/manifests/2.0?ns=docker.io", 200) in {
        (s.method, s.path, s.status) for s in seen}


async def test_ctr_falls_back_to_the_registry_when_the_mirror_cannot_answer(
        containerd, namespace, logged_mirror, upstream, tmp_path):
    """The mirror is up but its upstream is not (nothing cached): it must answer an error
    quickly, so containerd goes on to `server`, the registry itself, with its own tokens."""
    alpine = upstream.images["library/alpine"]
    _, seen, url = await logged_mirror(upstreams=(
        cfg.Upstream("docker.io", dead_url(), default=True),))
    hosts = tmp_path / "certs.d"
    write_hosts(hosts, "docker.io", upstream.url, [(url, "")])

    ns = namespace()
    (await containerd.pull(ns, "docker.io/library/alpine:3.19", hosts)).check()
    await assert_holds(containerd, ns, "docker.io/library/alpine:3.19", alpine)
    tried = [s for s in seen if s.path.startswith("/v2/library/alpine/manifests/3.19?ns=")]
    assert tried and all(s.status >= 400 for s in tried), seen
    # containerd itself fetched from the registry: the mirror's own upstream requests never
    # carry `ns` (and its upstream is dead here), containerd's do, whatever the host.
    layer = alpine.layer_digests[1]
    assert fetched(upstream, "GET", f"/v2/library/alpine/blobs/{layer}?ns=docker.io") == 1
    assert any("repository:library/alpine:pull" in t["scopes"] for t in upstream.tokens.requests)


async def test_ctr_falls_through_when_the_mirror_has_no_such_upstream(
        containerd, namespace, logged_mirror, upstream, tmp_path):
    """A hosts.toml for a registry the mirror does not serve: `ns=ghcr.io` names no upstream,
    so the mirror answers 404 without dialling anything and containerd uses `server`."""
    app = upstream.images["team/app"]
    _, seen, url = await logged_mirror()
    hosts = tmp_path / "certs.d"
    write_hosts(hosts, "ghcr.io", upstream.url, [(url, "")])

    ns = namespace()
    (await containerd.pull(ns, "ghcr.io/team/app:2.0", hosts)).check()
    await assert_holds(containerd, ns, "ghcr.io/team/app:2.0", app)
    assert seen and {(s.path.partition("?")[2], s.status) for s in seen} == {("ns=ghcr.io", 404)}
    # Every upstream request was containerd's own (it carries ns); the mirror sent none.
    assert upstream.proxy.records and all(
        r.path.endswith("ns=ghcr.io") for r in upstream.proxy.records)
