"""Names, tags and digests against the spec grammar; routing by ns, prefix and default."""

import pytest

from mirror import config as cfg
from mirror.errors import DigestInvalid, ManifestInvalid, NameInvalid, NameUnknown
from mirror.reference import Router, parse_digest, parse_name, parse_reference

ROUTER = Router(cfg.DEFAULT_UPSTREAMS)
SHA = "sha256:" + "a" * 64


@pytest.mark.parametrize("name", ["alpine", "library/alpine", "a/manifests/b", "a.b_c__d--e/f0",
                                  "quay.io/coreos/etcd"])
def test_valid_names(name):
    assert parse_name(name) == name


@pytest.mark.parametrize("name", ["Alpine", "../etc", "a/../b", "a//b", "-a", "a_", "a/.b",
                                  "a" * 256, "a%2e", ".."])
def test_invalid_names(name):
    with pytest.raises(NameInvalid):
        parse_name(name)


@pytest.mark.parametrize("digest", ["sha256:totallywrong", "sha256:" + "A" * 64, "md5:abc",
                                    "sha256:" + "a" * 63, "sha512:" + "a" * 64, "sha256"])
def test_invalid_digests(digest):
    with pytest.raises(DigestInvalid):
        parse_digest(digest)


def test_references():
    assert parse_reference("v1.2_x-y") == "v1.2_x-y"
    assert parse_reference(SHA) == SHA
    with pytest.raises(ManifestInvalid):
        parse_reference("-bad")
    with pytest.raises(ManifestInvalid):
        parse_reference("t" * 129)


@pytest.mark.parametrize("name, ns, prefix, upstream, routed", [
    ("alpine", None, None, "docker.io", "library/alpine"),
    ("library/alpine", None, None, "docker.io", "library/alpine"),
    ("library/alpine", "docker.io", None, "docker.io", "library/alpine"),
    ("hub/library/alpine", "docker.io", None, "docker.io", "library/alpine"),  # override_path
    ("hub/library/alpine", None, None, "docker.io", "library/alpine"),         # podman prefix
    ("hub/alpine", None, None, "docker.io", "library/alpine"),
    ("library/alpine", None, "hub", "docker.io", "library/alpine"),            # Docker >= 25
    ("coreos/etcd", "quay.io", None, "quay.io", "coreos/etcd"),
    ("quay.io/coreos/etcd", None, None, "quay.io", "coreos/etcd"),
    ("etcd", "quay.io", None, "quay.io", "etcd"),                               # no library/ off Hub
    ("pause", None, "registry.k8s.io", "registry.k8s.io", "pause"),
    ("quay.io", None, None, "docker.io", "library/quay.io"),  # a bare prefix is a name
])
def test_routing_order_ns_then_prefix_then_default(name, ns, prefix, upstream, routed):
    route = ROUTER.route(name, ns=ns, prefix=prefix)
    assert (route.upstream.name, route.name) == (upstream, routed)


def test_both_spellings_share_one_cache_entry():
    assert ROUTER.route("alpine").key == ROUTER.route("library/alpine").key


@pytest.mark.parametrize("ns, prefix", [("evil.example", None), ("127.0.0.1:1", None),
                                        (None, "nothere")])
def test_unknown_ns_or_prefix_is_name_unknown(ns, prefix):
    with pytest.raises(NameUnknown):
        ROUTER.route("library/alpine", ns=ns, prefix=prefix)
