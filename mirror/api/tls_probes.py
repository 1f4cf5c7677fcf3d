"""A TLS handshake sent to the plain-HTTP port: one warning that says what to do.

A client set up for https:// (or skopeo and podman with --tls-verify=false, which try
https:// first) sends a ClientHello that aiohttp's parser refuses as a bad method; the
access line it would get (`"UNKNOWN / HTTP/1.0" 400`) tells nobody anything. connections.py
asks `tls_on_plain_port` about each refused request.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod

from ..logs import UNLOGGED

log = logging.getLogger("mirror")

TLS_HELLO = "Received HTTPS traffic on an HTTP port"  # aiohttp's words for it


class TlsProbes:
    """Which client addresses were told about their TLS handshake on the plain port, and
    when: one warning per address per `window` seconds, since skopeo and podman with
    --tls-verify=false probe https:// before every pull over http://, and a scanner could
    send thousands. At most `addresses` are remembered (the least recent are forgotten),
    and at most `burst` warnings go out per `window` over all addresses."""

    def __init__(self, window: float = 600.0, addresses: int = 1024, burst: int = 10,
                 clock=time.monotonic):
        self.window, self.addresses, self.burst, self.clock = window, addresses, burst, clock
        self._told: OrderedDict[str, tuple[float, int]] = OrderedDict()  # when, probes since
        self._recent: list[float] = []

    def tell(self, remote: str) -> int | None:
        """None to stay quiet; else how many probes from `remote` went untold before."""
        now = self.clock()
        told, quiet = self._told.get(remote, (None, 0))
        self._recent = [t for t in self._recent if now - t < self.window]
        if (told is not None and now - told < self.window) or len(self._recent) >= self.burst:
            self._told[remote] = (told if told is not None else -self.window, quiet + 1)
            self._forget()
            return None
        self._told[remote] = (now, 0)
        self._told.move_to_end(remote)
        self._recent.append(now)
        self._forget()
        return quiet

    def _forget(self) -> None:
        while len(self._told) > self.addresses:
            self._told.popitem(last=False)


_probes = TlsProbes()


def tls_on_plain_port(request: web.BaseRequest, error: BaseException | None) -> bool:
    """Whether the request aiohttp's parser refused with `error` was a TLS handshake; if
    so, the warning (at most once per client per window) replaces the access line."""
    if not isinstance(error, BadHttpMethod) or TLS_HELLO not in str(error.message):
        return False
    request[UNLOGGED] = True
    remote = request.remote or "unknown"
    quiet = _probes.tell(remote)
    if quiet is None:
        return True
    transport = request.transport
    local = transport.get_extra_info("sockname") if transport is not None else None
    port = f" {local[1]}" if isinstance(local, tuple) and len(local) >= 2 else ""
    more = f" ({quiet} more from it since the last warning)" if quiet else ""
    log.warning("%s sent a TLS handshake to this plain-HTTP port%s%s: the client is set up "
                "for https:// but this mirror serves http://. Use http:// (or --tls-verify="
                "false, which makes skopeo and podman fall back to http after this) in the "
                "client, or serve HTTPS: set server.tls_certificate and server.tls_key "
                "(`mirror tls init` makes them). Told once per client per %.0f minutes.",
                remote, port, more, _probes.window / 60)
    return True
