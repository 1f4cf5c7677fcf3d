"""Where an upstream may send the mirror: the destination policy for redirects and token realms.

An upstream's `Location` (a CDN for blobs, registry.k8s.io for manifests) and its token
realm are URLs the upstream chooses; a hostile or compromised upstream could point them
at the cloud metadata service (169.254.169.254) or at a service on the mirror's own
network, and the mirror would fetch it and serve the answer as a manifest. So:

- only `http` and `https` are followed (a `file:` or `gopher:` Location is refused);
- the destination's addresses must all be public, or of the same kind as the upstream's
  own address (loopback, link-local, private): an upstream on 127.0.0.1 (the tests) may
  redirect to another loopback address, one on 10.0.0.5 to the private network, but
  neither to 169.254.169.254;
- a host name is resolved here, every address it resolves to is checked, and the request
  is then sent to a checked address (`Target.url`, with the name kept for the Host header
  and for TLS), never resolved again by the HTTP client. Checking a name and then letting
  the client resolve it anew would let a DNS answer that changes in between (rebinding)
  send the request to an address that was never checked.

The upstream's own origin (its configured scheme, host and port) is not checked: the
operator chose it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass

from yarl import URL

from ..errors import Unavailable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
SCHEMES = ("http", "https")


def kind(address: Address) -> str:
    """"global", "loopback", "link-local", "private" or "reserved" (everything else)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
    if address.is_loopback or address.is_unspecified:  # Linux delivers 0.0.0.0 locally
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_private:
        return "private"
    if address.is_global and not address.is_multicast:
        return "global"
    # Shared address space (100.64.0.0/10, where one cloud keeps its metadata service),
    # multicast, documentation and reserved ranges: nothing an upstream should send us to.
    return "reserved"


@dataclass(frozen=True)
class Target:
    """One checked way to reach a URL: dial `url`; send `host` as Host; verify TLS as `tls_name`."""

    url: URL
    host: str | None = None
    tls_name: str | None = None

    def request_options(self) -> dict:
        return {"server_hostname": self.tls_name} if self.tls_name else {}


def same_origin(a: URL, b: URL) -> bool:
    """Same scheme, host and port (https://h and https://h:443 are one origin)."""
    return (a.scheme.lower(), (a.raw_host or "").lower(), a.port) == \
        (b.scheme.lower(), (b.raw_host or "").lower(), b.port)


def literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# As the upstream session's connector (ttl_dns_cache=300); a few hosts per upstream.
RESOLVED_SECONDS = 300.0
RESOLVED_MAX = 256


class Destinations:
    """The policy for one upstream, whose configured base URL is `base`."""

    def __init__(self, name: str, base: URL) -> None:
        self.name = name
        self.base = base
        self._home: frozenset[str] | None = None  # the kinds of the upstream's own addresses
        # Answers of the resolver, as the connector's own DNS cache keeps them: every blob
        # of Docker Hub is redirected to its CDN, and one lookup per blob would be waste.
        # What comes from here is checked against the policy on every use all the same.
        self._resolved: dict[tuple[str, int | None], tuple[float, list[Address]]] = {}

    async def targets(self, url: URL, what: str = "redirected to") -> list[Target]:
        """The checked ways to reach `url`, in the resolver's order; raise Unavailable if
        the upstream may not send us there. Makes no connection."""
        if url.scheme not in SCHEMES:
            raise Unavailable(f"upstream {self.name} {what} a {url.scheme or 'relative'}: "
                              "URL; only http and https are followed")
        if not url.host:
            raise Unavailable(f"upstream {self.name} {what} a URL without a host")
        if same_origin(url, self.base):
            return [Target(url)]
        addresses = await self._resolve(url.raw_host or "", url.port, what)
        allowed = {"global"} | await self._home_kinds()
        for address in addresses:
            if (found := kind(address)) not in allowed:
                raise Unavailable(
                    f"upstream {self.name} {what} {url.scheme}://{url.host}, which is a "
                    f"{found} address ({address}); refused before connecting: an upstream may "
                    "send the mirror only to public addresses or to its own kind of address")
        if literal(url.raw_host or "") is not None:
            return [Target(url)]
        host_header = url.raw_host if url.explicit_port is None else \
            f"{url.raw_host}:{url.explicit_port}"
        tls_name = url.raw_host if url.scheme == "https" else None
        return [Target(url.with_host(str(a)), host_header, tls_name) for a in addresses]

    async def _resolve(self, host: str, port: int | None, what: str) -> list[Address]:
        if (address := literal(host)) is not None:
            return [address]
        cached = self._resolved.get((host, port))
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        addresses = await self._lookup(host, port, what)
        if len(self._resolved) >= RESOLVED_MAX:
            self._resolved.pop(next(iter(self._resolved)))
        self._resolved[host, port] = (time.monotonic() + RESOLVED_SECONDS, addresses)
        return addresses

    async def _lookup(self, host: str, port: int | None, what: str) -> list[Address]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise Unavailable(f"upstream {self.name} {what} {host}, which does not "
                              f"resolve: {e}") from e
        seen: list[Address] = []
        for family, *_, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                # The scope of a link-local IPv6 address ("fe80::1%eth0") is not an address.
                address = ipaddress.ip_address(sockaddr[0].partition("%")[0])
                if address not in seen:
                    seen.append(address)
        if not seen:
            raise Unavailable(f"upstream {self.name} {what} {host}, which has no address")
        return seen

    async def _home_kinds(self) -> frozenset[str]:
        if self._home is None:
            host = self.base.raw_host or ""
            if (address := literal(host)) is not None:
                self._home = frozenset({kind(address)})
            else:
                try:
                    addresses = await self._resolve(host, self.base.port, "is at")
                except Unavailable:
                    return frozenset()  # not cached: the next check resolves again
                self._home = frozenset(kind(a) for a in addresses)
        return self._home
