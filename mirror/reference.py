"""Names, tags and digests checked against the spec grammar, and routing a name to an upstream.

Nothing a client sends reaches the filesystem or an upstream before it passed these checks:
a name that is not in the distribution-spec grammar is NAME_INVALID, a digest that is not
`sha256:<64 hex>` or `sha512:<128 hex>` is DIGEST_INVALID.

Routing (PROTOCOL.md, "URL shapes"): the `ns` query parameter first (containerd adds it to
every request to a mirror), then a path prefix — outside `/<prefix>/v2/<name>` (Docker >= 25
mirror URLs) or inside `/v2/<prefix>/<name>` (podman `location = "m/hub"`) — then the
default upstream. `ns` and prefixes are keys into the configured upstreams, never hosts to
dial: an unknown one is NAME_UNKNOWN and opens no connection. So is a name whose first
component has a dot but names no upstream (`example.com/foo`) when the default is Docker
Hub (`library` set): no Hub namespace has a dot, so it can only be a registry host that is
not configured. (With another default, whose names may have dots, it goes there.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import config as cfg
from .errors import DigestInvalid, ManifestInvalid, NameInvalid, NameUnknown

NAME_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME = re.compile(rf"{NAME_COMPONENT}(?:/{NAME_COMPONENT})*")
TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# Distribution refuses names longer than this; so do we, before any disk or network work.
NAME_MAX = 255
DIGEST_HEX = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}


def parse_name(name: str) -> str:
    if len(name) > NAME_MAX:
        raise NameInvalid(f"repository name is longer than {NAME_MAX} characters")
    if not NAME.fullmatch(name):
        raise NameInvalid(
            f"invalid repository name {name[:300]!r}: lower-case letters, digits and "
            "separators (. _ __ -) in /-separated components")
    return name


def parse_digest(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    pattern = DIGEST_HEX.get(algorithm)
    if pattern is None or not pattern.fullmatch(encoded):
        raise DigestInvalid(
            f"invalid digest {digest[:200]!r}: expected sha256:<64 hex> or sha512:<128 hex>")
    return digest


def is_digest(reference: str) -> bool:
    return ":" in reference


def parse_tag(tag: str) -> str:
    if not TAG.fullmatch(tag):
        raise ManifestInvalid(f"invalid tag {tag[:200]!r}: expected [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")
    return tag


def parse_reference(reference: str) -> str:
    """A manifest reference is a digest (it has a colon) or a tag."""
    return parse_digest(reference) if is_digest(reference) else parse_tag(reference)


@dataclass(frozen=True)
class Route:
    """Where one request goes: the upstream, and the repository name as that upstream knows it."""

    upstream: cfg.Upstream
    name: str

    @property
    def key(self) -> str:
        """The cache's name for this repository; `alpine` and `library/alpine` share it."""
        return f"{self.upstream.name}/{self.name}"

    @property
    def catalog_name(self) -> str:
        """The name a client pulls this repository back by (in `_catalog`): the default
        upstream's names as they are, any other upstream's with its name in front."""
        return self.name if self.upstream.default else self.key


class Router:
    def __init__(self, upstreams: tuple[cfg.Upstream, ...]):
        self.by_prefix = {p: u for u in upstreams for p in u.prefixes}
        self.default = next((u for u in upstreams if u.default), None)

    def upstream_for_prefix(self, prefix: str) -> cfg.Upstream:
        try:
            return self.by_prefix[prefix]
        except KeyError:
            raise NameUnknown(f"no upstream is configured for prefix {prefix[:100]!r}") from None

    def route(self, name: str, ns: str | None = None, prefix: str | None = None) -> Route:
        name = parse_name(name)
        first, _, rest = name.partition("/")
        if ns is not None:
            upstream = self.by_prefix.get(ns)
            if upstream is None:
                raise NameUnknown(f"no upstream is configured for ns={ns[:100]!r}")
            # containerd with override_path sends /v2/hub/library/alpine?ns=docker.io.
            if rest and self.by_prefix.get(first) is upstream:
                name = rest
        elif prefix is not None:
            upstream = self.upstream_for_prefix(prefix)
        elif rest and first in self.by_prefix:
            upstream, name = self.by_prefix[first], rest
        elif rest and "." in first and self.default is not None and self.default.adds_library:
            # A registry host that is not configured (podman's `location = "m/example.com"`),
            # not a Docker Hub name: Hub namespaces have no dots. Asking Docker Hub would only
            # get its 401 for a missing repository, after a token round trip.
            raise NameUnknown(
                f"no upstream is configured for {first[:100]!r}, and {name[:200]} is no Docker "
                f"Hub name (its namespaces have no dots); configured: "
                f"{', '.join(sorted(self.by_prefix))}")
        elif self.default is not None:
            upstream = self.default
        elif not self.by_prefix:  # upstreams = []: a plain private registry
            raise NameUnknown(f"repository {name} is not known to this registry (it has no "
                              "upstreams: hosted repositories only)")
        else:
            raise NameUnknown(f"{name} names no configured upstream and there is no default")
        if upstream.adds_library and "/" not in name:
            name = f"library/{name}"
        return Route(upstream, name)
