"""Peers: how replicas authenticate their requests to each other's internal endpoint.

A replica asks the one holding a fill for its bytes (`GET /_mirror/fills/<digest>`) with
`X-Mirror-Peer: <replica>:<unix time>:<hex HMAC-SHA256 of "<replica>:<time>:<path>">`,
keyed by `cluster.secret`. The holder accepts it for PEER_SKEW seconds either way: a
captured header opens only that path, only briefly, and the secret never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "X-Mirror-Peer"
PEER_SKEW = 60.0
PATH = "/_mirror/fills/"


def sign(secret: str, replica: str, path: str, now: float | None = None) -> str:
    stamp = str(int(time.time() if now is None else now))
    return f"{replica}:{stamp}:{_mac(secret, replica, stamp, path)}"


def verify(secret: str, header: str, path: str, now: float | None = None) -> str | None:
    """The signing replica's name when `header` is a valid signature of `path`, else None."""
    try:  # the replica's name may hold colons itself (host:port): split from the right
        replica, stamp, mac = header.rsplit(":", 2)
        age = abs((time.time() if now is None else now) - int(stamp))
    except ValueError:
        return None
    if age > PEER_SKEW or not hmac.compare_digest(mac, _mac(secret, replica, stamp, path)):
        return None
    return replica


def _mac(secret: str, replica: str, stamp: str, path: str) -> str:
    return hmac.new(secret.encode(), f"{replica}:{stamp}:{path}".encode(),
                    hashlib.sha256).hexdigest()
