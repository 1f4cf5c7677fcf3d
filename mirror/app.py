"""make_app(config): the aiohttp application with its middleware, routes and resources.

The resources (client session, upstreams, blob store, index, fills) live in one cleanup
context, so they are created when the server starts and closed when it stops, in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

import aiohttp
from aiohttp import web

from . import banner, errors, logs, metrics
from .api import connections, routes
from .api.access import Access
from .api.tokens import TokenKey
from .cache.budget import Budget
from .cache.fills import Fills
from .cache.hosted import Hosted
from .cache.proxy import Proxy
from .cluster.fills import FillLeases
from .config import Config
from .keys import (
    ACCESS,
    BUDGET,
    CONFIG,
    HOSTED,
    POLICY,
    PROXY,
    REPLICAS,
    ROUTER,
    SCANNER,
    SIGNATURES,
    TRENDS,
    UPLOADS,
)
from .ops import housekeeping
from .ops.trends import Trends
from .reference import Router
from .storage.blobs import BlobStore
from .storage.index import Index
from .storage.lock import ServerLock
from .storage.memory import Memory
from .storage.metadata import Metadata
from .storage.sqlite import SqliteMetadata
from .storage.uploads import Uploads
from .trust.rules import PullPolicy
from .trust.scanner import Scanner
from .trust.signatures import Signatures
from .upstream.client import Upstream
from .upstream.slots import Shared

if TYPE_CHECKING:  # the cluster's parts are imported only when a cluster is configured
    from .cluster.lease import Lease
    from .cluster.replicas import Replicas
    from .storage.object_uploads import ObjectUploads

log = logging.getLogger("mirror")

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def make_app(config: Config) -> web.Application:
    middlewares = [errors.middleware, routes.refuse_hostile_paths]
    # Always installed: without logins it still keeps pushes to loopback clients.
    # Client tokens (api/tokens.py): every replica signs with the cluster's secret.
    access = Access(config.access, TokenKey(
        config.storage.root, config.cluster.secret if config.cluster.redis else None,
        config.cluster.name))
    middlewares.append(access.middleware())
    # Request line, header and keep-alive limits and the header deadline: api/connections.py.
    app = connections.Application(config.limits, middlewares=middlewares)
    access.install(app)  # the startup warning; its password-check threads stop with the app
    app[ACCESS] = access  # its token service answers /auth/token
    app[CONFIG] = config
    app[errors.STORAGE_ROOT] = config.storage.root
    app[ROUTER] = Router(config.upstreams)
    app.cleanup_ctx.append(_resources)
    app.on_response_prepare.append(_api_version)
    app[metrics.METRICS] = app_metrics = metrics.Metrics()
    app.on_response_prepare.append(app_metrics.on_response_prepare)
    app[POLICY] = PullPolicy(config, app_metrics)  # [[policy.rules]], asked by routes.py
    app[SIGNATURES] = Signatures(config, app_metrics)  # keys read now: a bad file stops here
    app[SCANNER] = Scanner(config.policy, app_metrics)  # policy.scan_webhook, after them
    app.cleanup_ctx.append(app[SCANNER].session)  # its own webhook session
    # The status page's trends: sampled after the resources start, stopped before they close.
    app[TRENDS] = Trends(app_metrics)
    app.cleanup_ctx.append(app[TRENDS].running)
    logs.install(app)
    routes.setup(app)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    lock = ServerLock(config.storage.root)  # gc leaves our spools alone
    try:
        parts = await (_shared_parts(config) if config.cluster.redis else _local_parts(config))
    except BaseException:
        lock.release()
        raise
    metadata, store, memory = parts.metadata, parts.store, parts.memory
    store.remove_spools()
    index = Index(metadata, memory, store.remote)
    app_metrics = app[metrics.METRICS]
    fills = Fills(store, metrics=app_metrics)
    app_metrics.fills_in_progress.set_function(lambda: len(fills.active))
    # auto_decompress off: blobs and manifests are hashed and served exactly as sent.
    session = aiohttp.ClientSession(
        auto_decompress=False,
        # Bigger reads mean fewer wake-ups per blob: aiohttp's default 64 KiB buffer pauses
        # the upstream socket every two reads.
        read_bufsize=1 << 20,
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        cookie_jar=aiohttp.DummyCookieJar())
    slots = Shared(config.limits)  # global request slots and body permits
    upstreams = {u.name: Upstream(u, config.limits, session, memory, slots, metrics=app_metrics)
                 for u in config.upstreams}
    leases = None
    if parts.redis is not None and config.cluster.secret is not None:
        leases = FillLeases(parts.redis, parts.prefix, parts.replica, _advertise(config),
                            config.cluster.secret, session, config.limits.stall_timeout,
                            metrics=app_metrics)
    app[PROXY] = Proxy(upstreams, index, store, fills, offline=config.server.offline,
                       cluster=leases)
    app[HOSTED] = await Hosted.open(index, store, config.hosted, app[ROUTER],
                                    shared=parts.redis is not None)
    uploads = app[UPLOADS] = parts.uploads
    # Bytes the ledger does not count: resumable spools on this disk (not with S3, whose
    # budget is the bucket's) and uploads in progress.
    extra = (uploads.total_bytes if store.remote is not None
             else lambda: fills.partial_bytes() + uploads.total_bytes())
    app[BUDGET] = budget = Budget(config.storage, index, store,
                                  in_flight=lambda digest: digest in fills.active,
                                  extra=extra, release=fills.release_partials,
                                  link_grace=config.hosted.upload_ttl, lease=parts.lease,
                                  replicas=parts.replicas, metrics=app_metrics)
    if store.tier is not None:
        store.tier.in_use = budget.held
    if parts.replicas is not None:
        parts.replicas.holds = lambda: list(budget.readers)
        app[REPLICAS] = parts.replicas
    log.info("%s", banner.startup(config, parts.where))
    background = [asyncio.ensure_future(uploads.expire_forever()),
                  asyncio.ensure_future(budget.run_forever())]
    if parts.replicas is not None:
        background.append(asyncio.ensure_future(_beat_forever(parts.replicas)))
    yield
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await fills.close()
    await session.close()
    if parts.replicas is not None:
        await parts.replicas.leave()
    await memory.close()
    await metadata.close()
    if store.remote is not None:
        await store.remote.close()
    if parts.redis is not None:
        await parts.redis.aclose()
    lock.release()


@dataclass
class _Parts:
    """What storage is made of: one node's disk, or the cluster's Redis and bucket."""

    metadata: Metadata
    store: BlobStore
    memory: Memory
    uploads: Uploads | ObjectUploads
    where: str  # for the startup line
    redis: Any = None
    prefix: str = ""
    replica: str = ""
    lease: Lease | None = None
    replicas: Replicas | None = None


async def _local_parts(config: Config) -> _Parts:
    metadata = SqliteMetadata(config.storage.root)
    store = BlobStore(config.storage.root, metadata)
    reconciled = await housekeeping.reconcile(store, metadata)
    if reconciled.entered or reconciled.forgotten:
        log.info("reconciled the ledger with the disk: %d stored items entered, %d missing "
                 "ones forgotten", reconciled.entered, reconciled.forgotten)
    uploads = Uploads(config.storage.root, store, config.hosted.upload_ttl,
                      max_size=config.hosted.max_upload_size,
                      per_client=config.hosted.max_uploads_per_client)
    return _Parts(metadata, store, Memory(), uploads, str(store.root.resolve()))


async def _shared_parts(config: Config) -> _Parts:
    """S3 for the bytes, Redis for the metadata, the memory tier, uploads and the lease."""
    from redis.asyncio import from_url
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from .cluster.lease import Lease
    from .cluster.replicas import Replicas
    from .storage.object_uploads import ObjectUploads
    from .storage.redis_metadata import RedisMetadata
    from .storage.s3 import ObjectStore, S3Settings

    cluster, storage = config.cluster, config.storage
    prefix = f"{cluster.name}:"
    replica = cluster.replica or f"{socket.gethostname()}:{config.server.port}"
    remote = await ObjectStore.open(S3Settings(**dataclasses.asdict(storage.s3)))
    try:
        metadata = await RedisMetadata.connect(cluster.redis, prefix)
    except BaseException:
        await remote.close()
        raise
    # One quick retry of a refused, reset or slow connection before a caller falls back
    # (a lease claim to filling alone): a busy moment must not cost an upstream fetch.
    redis = from_url(cluster.redis, socket_connect_timeout=5, socket_timeout=5,
                     retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), 1,
                                 (RedisConnectionError, RedisTimeoutError)))
    store = BlobStore(storage.root, metadata, remote, storage.local_cache_size)
    if store.tier is not None:
        await asyncio.get_running_loop().run_in_executor(None, store.tier.load)
    uploads = ObjectUploads(store, redis, prefix, config.hosted.upload_ttl,
                            max_size=config.hosted.max_upload_size,
                            per_client=config.hosted.max_uploads_per_client)
    lease = Lease(redis, f"{prefix}lease:evict", replica, ttl=30.0)
    replicas = Replicas(redis, prefix, replica)
    under = f" under {storage.s3.prefix}" if storage.s3.prefix else ""
    where = (f"s3 bucket {storage.s3.bucket}{under} at {storage.s3.endpoint or 'AWS'}, "
             f"metadata in Redis (cluster {cluster.name}, replica {replica}), local tier "
             f"{store.tier.limit if store.tier else 0} bytes in {store.root.resolve()}")
    return _Parts(metadata, store, Memory(cluster.redis, f"{prefix}memory:"), uploads, where,
                  redis, prefix, replica, lease, replicas)


def _advertise(config: Config) -> str:
    """The URL other replicas stream this one's fills from: cluster.advertise, else the
    listening address when it is a specific one, else the host name."""
    if config.cluster.advertise is not None:
        return config.cluster.advertise
    scheme = "https" if config.server.tls_certificate else "http"
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{config.server.port}"


async def _beat_forever(replicas: Replicas) -> None:
    """The replica's heartbeat, with the blobs its responses are sending now."""
    from .cluster.replicas import BEAT

    while True:
        await replicas.beat()
        await asyncio.sleep(BEAT)


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, when a certificate and key are configured."""
    if config.server.tls_certificate is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.server.tls_certificate, config.server.tls_key)
    return context


async def _api_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(API_VERSION)
