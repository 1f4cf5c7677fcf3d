"""make_app(config): the aiohttp application with its middleware, routes and resources.

The resources (client session, upstreams, blob store, index, fills) live in one cleanup
context, so they are created when the server starts and closed when it stops, in order.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import AsyncIterator

import aiohttp
from aiohttp import web

from . import errors, logs, metrics
from .api import connections, routes
from .api.access import Access
from .cache.budget import Budget
from .cache.fills import Fills
from .cache.hosted import Hosted
from .cache.proxy import Proxy
from .config import Config
from .keys import BUDGET, CONFIG, HOSTED, PROXY, ROUTER, UPLOADS
from .ops import housekeeping
from .reference import Router
from .storage.blobs import BlobStore
from .storage.index import Index
from .storage.lock import ServerLock
from .storage.memory import Memory
from .storage.sqlite import SqliteMetadata
from .storage.uploads import Uploads
from .upstream.client import Upstream
from .upstream.slots import Shared

log = logging.getLogger("mirror")

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def make_app(config: Config) -> web.Application:
    middlewares = [errors.middleware, routes.refuse_hostile_paths]
    # Always installed: without logins it still keeps pushes to loopback clients.
    access = Access(config.access)
    middlewares.append(access.middleware())
    # Request line, header and keep-alive limits and the header deadline: api/connections.py.
    app = connections.Application(config.limits, middlewares=middlewares)
    access.install(app)  # the startup warning; its password-check threads stop with the app
    app[CONFIG] = config
    app[errors.STORAGE_ROOT] = config.storage.root
    app[ROUTER] = Router(config.upstreams)
    app.cleanup_ctx.append(_resources)
    app.on_response_prepare.append(_api_version)
    app.on_response_prepare.append(metrics.on_response_prepare)
    logs.install(app)
    routes.setup(app)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    memory = Memory()
    metadata = SqliteMetadata(config.storage.root)
    lock = ServerLock(config.storage.root)  # gc leaves our spools alone
    store = BlobStore(config.storage.root, metadata)
    store.remove_spools()
    index = Index(metadata, memory)
    fills = Fills(store)
    reconciled = await housekeeping.reconcile(store, metadata)
    if reconciled.entered or reconciled.forgotten:
        log.info("reconciled the ledger with the disk: %d stored items entered, %d missing "
                 "ones forgotten", reconciled.entered, reconciled.forgotten)
    # auto_decompress off: blobs and manifests are hashed and served exactly as sent.
    session = aiohttp.ClientSession(
        auto_decompress=False,
        # Bigger reads mean fewer wake-ups per blob: aiohttp's default 64 KiB buffer pauses
        # the upstream socket every two reads.
        read_bufsize=1 << 20,
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        cookie_jar=aiohttp.DummyCookieJar())
    slots = Shared(config.limits)  # global request slots and body permits
    upstreams = {u.name: Upstream(u, config.limits, session, memory, slots)
                 for u in config.upstreams}
    app[PROXY] = Proxy(upstreams, index, store, fills, offline=config.server.offline)
    app[HOSTED] = await Hosted.open(index, store, config.hosted, app[ROUTER])
    app[UPLOADS] = Uploads(config.storage.root, store, config.hosted.upload_ttl,
                           max_size=config.hosted.max_upload_size,
                           per_client=config.hosted.max_uploads_per_client)
    uploads = app[UPLOADS]
    app[BUDGET] = Budget(config.storage, index, store,
                         in_flight=lambda digest: digest in fills.active,
                         extra=lambda: fills.partial_bytes() + uploads.total_bytes(),
                         release=fills.release_partials,
                         link_grace=config.hosted.upload_ttl)
    log.info("serving %s with data in %s; upstreams: %s", config.server.listen,
             store.root.resolve(), ", ".join(
                 f"{u.name}={u.url}{' (default)' if u.default else ''}" for u in config.upstreams))
    background = [asyncio.ensure_future(app[UPLOADS].expire_forever()),
                  asyncio.ensure_future(app[BUDGET].run_forever())]
    yield
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await fills.close()
    await session.close()
    await memory.close()
    await metadata.close()
    lock.release()


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, when a certificate and key are configured."""
    if config.server.tls_certificate is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.server.tls_certificate, config.server.tls_key)
    return context


async def _api_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(API_VERSION)
