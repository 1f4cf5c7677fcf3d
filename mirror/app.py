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
from .api import routes
from .api.access import Access
from .cache.budget import Budget
from .cache.fill import Fills
from .cache.hosted import Hosted
from .cache.proxy import Proxy
from .config import Config
from .keys import BUDGET, CONFIG, HOSTED, PROXY, ROUTER, UPLOADS
from .ops.housekeeping import adopt
from .reference import Router
from .storage.blobs import BlobStore
from .storage.index import Index
from .storage.memory import Memory
from .storage.uploads import Uploads
from .storage.usage import Usage
from .upstream.client import Upstream

log = logging.getLogger("mirror")

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def make_app(config: Config) -> web.Application:
    middlewares = [errors.middleware, routes.refuse_hostile_paths]
    if config.access.htpasswd is not None or config.access.read_only:
        middlewares.append(Access(config.access).middleware())
    app = web.Application(middlewares=middlewares)
    app[CONFIG] = config
    app[ROUTER] = Router(config.upstreams)
    app.cleanup_ctx.append(_resources)
    app.on_response_prepare.append(_api_version)
    app.on_response_prepare.append(metrics.on_response_prepare)
    logs.install(app, config.server.log_format)
    routes.setup(app)
    return app


async def _resources(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    memory = Memory()
    usage = Usage(config.storage.root)
    store = BlobStore(config.storage.root, usage)
    store.remove_spools()
    index = Index(config.storage.root, memory, usage)
    fills = Fills(store)
    if usage.new and (adopted := adopt(store, index, usage)):
        log.info("entered %d stored items into the new usage ledger", adopted)
    # auto_decompress off: blobs and manifests are hashed and served exactly as sent.
    session = aiohttp.ClientSession(
        auto_decompress=False,
        # Bigger reads mean fewer wake-ups per blob: aiohttp's default 64 KiB buffer pauses
        # the upstream socket every two reads.
        read_bufsize=1 << 20,
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        cookie_jar=aiohttp.DummyCookieJar())
    slots = asyncio.Semaphore(config.limits.upstream_requests)
    upstreams = {u.name: Upstream(u, config.limits, session, memory, slots)
                 for u in config.upstreams}
    app[PROXY] = Proxy(upstreams, index, store, fills, offline=config.server.offline)
    app[HOSTED] = Hosted(config.storage.root, index, store, config.hosted, app[ROUTER])
    app[UPLOADS] = Uploads(config.storage.root, store, config.hosted.upload_ttl)
    app[BUDGET] = Budget(config.storage, usage, store, index, app[HOSTED])
    log.info("serving %s with data in %s; upstreams: %s", config.server.listen,
             store.root.resolve(), ", ".join(
                 f"{u.name}={u.url}{' (default)' if u.default else ''}" for u in config.upstreams))
    housekeeping = [asyncio.ensure_future(app[UPLOADS].expire_forever()),
                    asyncio.ensure_future(app[BUDGET].run_forever())]
    yield
    for task in housekeeping:
        task.cancel()
    await fills.close()
    await session.close()
    await memory.close()
    app[HOSTED].close()
    index.close()
    usage.close()


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, when a certificate and key are configured."""
    if config.server.tls_certificate is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.server.tls_certificate, config.server.tls_key)
    return context


async def _api_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(API_VERSION)
