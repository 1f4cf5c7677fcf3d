"""The internal endpoint replicas stream each other's fills from: GET /_mirror/fills/<digest>.

Only for requests signed with `cluster.secret` (cluster/peers.py); anything else is 404, as
if the route did not exist, so it tells a scanner nothing. A fill running here is sent from
its spool as it grows, Range included, with the last byte only after the digest checked out
(api/responses.py's fill_response, exactly what a client of this replica gets); a blob
already stored here is sent as any stored blob is. Outside /v2/, so no registry route can
collide with it, and exempt from client logins: the signature is its login.
"""

from __future__ import annotations

from aiohttp import web

from ..cluster import peers
from ..errors import BlobUnknown, NameUnknown
from ..keys import BUDGET, CONFIG, PROXY
from ..metrics import METRICS
from ..reference import parse_digest
from .responses import fill_response, stored_response


async def fill_stream(request: web.Request) -> web.StreamResponse:
    secret = request.app[CONFIG].cluster.secret
    signed = request.headers.get(peers.HEADER, "")
    if secret is None or peers.verify(secret, signed, request.path) is None:
        raise NameUnknown(f"no registry API route for {request.path}")
    digest = parse_digest(request.match_info["digest"])
    proxy = request.app[PROXY]
    headers = {"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"}
    found = proxy.fills.reader(digest)
    if found is not None:
        fill, fd = found
        request.app[METRICS].peer_streams.inc()
        fill.readers += 1
        try:
            return await fill_response(request, fill, fd, headers)
        finally:
            fill.readers -= 1
    hold = request.app[BUDGET].hold(digest)
    size = await proxy.stored_size(digest)
    if size is None:
        hold.release()
        raise BlobUnknown(f"{digest} is neither being fetched nor stored here")
    return await stored_response(request, proxy, digest, size, headers, hold)
