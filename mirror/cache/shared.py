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
    # No await between the claim's answer and fills.join: another request here that finds
    # the lease taken (by this replica) must find this fill active, not follow itself; and
    # a fill found active must be joined before it can end (releasing first let it end
    # meanwhile, and the join then started a second upstream fetch).
    claim = await leases.claim(digest)
    if digest in fills.active:  # another request here started it meanwhile
        joined = fills.join(digest, from_upstream, route=route.key)
        if isinstance(claim, Holding):
            await claim.release()
        return joined
    if isinstance(claim, Following):
        leases.metrics.cluster_fills.labels("follower").inc()
        fill, fd = fills.join(digest, lambda start: leases.stream(claim.url, digest, start),
                              route=f"replica {claim.replica}")
        fill.upload = False  # the holder uploads it; one copy into the bucket, not N
        fill.add_source(f"{route.key} (taking over from {claim.replica})",
                        lambda start: _takeover(leases, store, fill, claim, digest, start,
                                                from_upstream))
        return fill, fd
    if isinstance(claim, Alone):
        leases.metrics.cluster_fills.labels("alone").inc()
        return fills.join(digest, from_upstream, route=route.key)
    fill, fd = fills.join(
        digest, lambda start: _bucket_or(leases, store, digest, start, from_upstream),
        route=route.key)
    fill.on_done.append(claim.release)
    return fill, fd


@contextlib.asynccontextmanager
async def _bucket_or(leases: FillLeases, store: BlobStore, digest: str, start: int,
                     from_upstream: Opener) -> AsyncIterator[Any]:
    """The holder's first source. Its caller missed the blob before it claimed the lease,
    and another replica's fill may have committed it and released the lease in between:
    then the bucket's copy is read, not the upstream's a second time (a loaded CI run saw
    two upstream GETs of one layer for 32 clients over 3 replicas). Only a holder that
    goes to the upstream counts as one."""
    if store.remote is not None and await store.stat(digest) is not None:
        async with object_body(store, digest, start) as body:
            yield body
        return
    leases.metrics.cluster_fills.labels("holder").inc()
    async with from_upstream(start) as body:
        yield body


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
