"""One request's credentials and address, and the count of failed logins per client.

Used by the policy in access.py: `basic_credentials` reads an Authorization header the way
clients send it (the empty `Basic Og==` of containers/image is anonymous), `is_loopback`
and `client_key` say where a request comes from, `Failures` limits password guessing.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import logging
import math
import time
from collections import Counter, OrderedDict, deque

from ..errors import TooManyRequests, Unauthorized

log = logging.getLogger("mirror")

FAILURE_WINDOW = 60.0
FAILURE_ADDRESSES = 10_000  # client addresses whose failures are tracked at most


def basic_credentials(header: str | None) -> tuple[str, bytes] | None:
    """(user, password) from an Authorization header; None when anonymous (no header, or
    the empty `Basic Og==` of containers/image); Unauthorized when it cannot be read."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise Unauthorized("only Basic credentials are accepted here")
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII character
        raise Unauthorized("malformed Basic credentials") from None
    name, sep, password = decoded.partition(b":")
    if not sep:
        raise Unauthorized("malformed Basic credentials (no colon)")
    if not name and not password:
        return None
    try:
        return name.decode("utf-8"), password
    except UnicodeDecodeError:
        raise Unauthorized("the user name is not UTF-8") from None


@functools.lru_cache(maxsize=4096)  # parsing an address costs more than the rest of a check
def is_loopback(remote: str | None) -> bool:
    """127.0.0.0/8, ::1 and ::ffff:127.x are this host; anything else (or no address) is not."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def client_key(remote: str | None) -> str:
    """Whose failures these are: the IPv4 address, or the IPv6 /64 (one host's share)."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


class Failures:
    """Failed logins per client in the last minute, for at most FAILURE_ADDRESSES clients
    (the least recently failing are forgotten first). Checks in progress count as failures
    until they succeed, so a burst of concurrent guesses cannot outrun the limit."""

    def __init__(self, limit: int, clock=time.monotonic):
        self.limit = limit
        self.clock = clock
        self._times: OrderedDict[str, deque[float]] = OrderedDict()
        self._checking: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._times)

    def begin(self, client: str) -> None:
        """Raise TooManyRequests when `client` has used up its attempts; else count one."""
        times = self._times.get(client, ())
        now = self.clock()
        recent = [t for t in times if now - t < FAILURE_WINDOW]
        if len(recent) + self._checking[client] >= self.limit:
            wait = math.ceil(recent[0] + FAILURE_WINDOW - now) if recent else 1
            raise TooManyRequests(
                f"too many failed logins from this address; try again in {wait} s",
                headers={"Retry-After": str(max(wait, 1))})
        self._checking[client] += 1

    def end(self, client: str, failed: bool) -> None:
        self._checking[client] -= 1
        if self._checking[client] <= 0:
            del self._checking[client]
        if not failed:
            return
        times = self._times.pop(client, None) or deque(maxlen=self.limit)
        times.append(self.clock())
        self._times[client] = times
        if sum(self.clock() - t < FAILURE_WINDOW for t in times) == self.limit:
            log.warning("%d failed logins from %s within a minute: its logins get 429 for "
                        "a while", self.limit, client)
        while len(self._times) > FAILURE_ADDRESSES:
            self._times.popitem(last=False)
