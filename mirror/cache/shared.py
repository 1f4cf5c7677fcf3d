"""shared_fill: how a new fill starts when several replicas share the work (cluster/fills.py).

The replica that takes the digest's lease fills from the upstream as one node does and
releases the lease when its fill ended. One that finds another replica holding it follows:
its fill's first source is the holder's stream, its second a takeover, which goes on from
the bucket (the holder got to commit), from the upstream once the dead holder's lease
lapsed and is ours (asking only for the bytes not relayed yet), or from whichever replica
took the lease first. Without Redis the replica fills alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ..cluster.fills import LEASE_SECONDS, Alone, FillLeases, Following, Holding
from ..errors import Unavailable
from ..reference import Route
from ..storage.blobs import BlobStore
from .fill import Fill, Opener
from .fills import Fills
from .objects import object_body

log = logging.getLogger("mirror")


async def shared_fill(leases: FillLeases, fills: Fills, store: BlobStore, route: Route,
                      digest: str, from_upstream: Opener) -> tuple[Fill, int]:
    claim = await leases.claim(digest)
    if digest in fills.active:  # another request here started it meanwhile
        if isinstance(claim, Holding):
            await claim.release()
        return fills.join(digest, from_upstream, route=route.key)
    if isinstance(claim, Following):
        leases.metrics.cluster_fills.labels("follower").inc()
        fill, fd = fills.join(digest, lambda start: leases.stream(claim.url, digest, start),
                              route=f"replica {claim.replica}")
        fill.upload = False  # the holder uploads it; one copy into the bucket, not N
        fill.add_source(f"{route.key} (taking over from {claim.replica})",
                        lambda start: _takeover(leases, store, fill, claim, digest, start,
                                                from_upstream))
        return fill, fd
    leases.metrics.cluster_fills.labels("holder" if isinstance(claim, Holding) else "alone").inc()
    fill, fd = fills.join(digest, from_upstream, route=route.key)
    if isinstance(claim, Holding):
        fill.on_done.append(claim.release)
    return fill, fd


@contextlib.asynccontextmanager
async def _takeover(leases: FillLeases, store: BlobStore, fill: Fill, dead: Following,
                    digest: str, start: int, from_upstream: Opener) -> AsyncIterator[Any]:
    """Go on with a fill whose holder's stream broke, from byte `start`."""
    deadline = time.monotonic() + LEASE_SECONDS + 5
    while True:
        if store.remote is not None and await store.stat(digest) is not None:
            async with object_body(store, digest, start) as body:
                yield body
            return
        claim = await leases.claim(digest)
        if isinstance(claim, (Holding, Alone)):
            if isinstance(claim, Holding):
                fill.on_done.append(claim.release)
            leases.metrics.cluster_takeovers.inc()
            fill.upload = True  # the holder is gone: this fill is the one that stores it
            log.info("taking over the fill of %s from replica %s at byte %d", digest,
                     dead.replica, start)
            async with from_upstream(start) as body:
                yield body
            return
        if claim.url != dead.url:
            async with leases.stream(claim.url, digest, start) as body:
                yield body
            return
        if time.monotonic() > deadline:
            raise Unavailable(f"replica {dead.replica} stopped sending {digest} and still "
                              "holds its lease")
        await asyncio.sleep(0.2)
