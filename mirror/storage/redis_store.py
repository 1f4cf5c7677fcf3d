"""RedisStore: one Redis connection under a key prefix, with optimistic transactions, typed
errors and the cluster marker that tells a Redis that lost its data from one that answers.

Every key starts with the prefix (`mirror:` by default), so two clusters, or two tests, can
share one Redis server. `<prefix>cluster` holds a random id written once (SET NX) by the
first replica that connects; a replica remembers the id it saw, and `check()` fails with
MetadataLost when the id is gone or different: Redis restarted without persistence (or was
flushed) and the ledger, tags and hosted repositories went with it.

Failures are typed like the SQLite store's (database.py), as RegistryErrors:

    StorageError                   500
    └── MetadataUnavailable        503 UNAVAILABLE, Retry-After: 5   (metadata.py: Redis down,
        │                                                             timing out, refusing)
        └── MetadataLost                                             (Redis lost its data)

`RedisMetadata` (redis_metadata.py) builds the metadata interface on it, with the usage
ledger from redis_ledger.py.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, WatchError

from .metadata import MetadataBroken, MetadataUnavailable

log = logging.getLogger("mirror")

T = TypeVar("T")

# A transaction whose watched keys another writer changed runs again, this many times in all.
ATTEMPTS = 5


class MetadataLost(MetadataUnavailable):
    """Redis answers, but without the data it held: it restarted without persistence."""


def public_url(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{user}{host}{port}").geturl()


def client_url(client: aioredis.Redis) -> str:
    """Where a client connects, without its password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"redis://{host}:{port}/{kwargs.get('db', 0)}"


def tag_id(repository: str, tag: str, accept_class: str) -> str:
    return f"{repository}:{tag}:{accept_class}"


def split_tag_id(value: str) -> tuple[str, str, str]:
    # A repository key may hold a colon (a registry's port); a tag and an Accept class never.
    repository, tag, accept_class = value.rsplit(":", 2)
    return repository, tag, accept_class


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def guarded(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Every Redis failure of `method` becomes MetadataUnavailable; before it runs, the
    ledger writes queued on this instance are written (see RedisLedger._settle)."""
    @functools.wraps(method)
    async def call(self: RedisStore, *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise MetadataBroken("the metadata store is closed")
        await self._settle()
        try:
            result = await method(self, *args, **kwargs)
        except RedisError as e:
            raise self._failed(e) from e
        self._reachable()
        return result
    return call


class RedisStore:
    """`client` must not decode responses (manifest bodies are bytes): `connect` makes one."""

    def __init__(self, client: aioredis.Redis, prefix: str = "mirror:", *,
                 url: str | None = None):
        self.client = client
        self.prefix = prefix
        self.url = public_url(url) if url is not None else client_url(client)  # for messages
        self._cluster: bytes | None = None  # the marker's value when this instance started
        self._down = False  # in an outage: logged once, at its start
        self._closed = False

    @classmethod
    async def connect(cls, url: str, prefix: str = "mirror:") -> Self:
        client = aioredis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=10,
            # One quick retry, on a refused or reset connection only (a pooled socket that
            # a Redis restart closed); a timeout is not retried (retry_on_timeout off, the
            # deprecated flag's meaning), so a dead Redis costs seconds, not a backoff.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), 1, (RedisConnectionError,)))
        store = cls(client, prefix, url=url)
        try:
            await store._start()
        except RedisError as e:
            await client.aclose()
            raise store._failed(e) from e
        return store

    async def _start(self) -> None:
        """Write the cluster marker if this is the first replica, and remember it."""
        marker = self.key("cluster")
        await self.client.set(marker, uuid.uuid4().hex, nx=True)
        self._cluster = await self.client.get(marker)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def _settle(self) -> None:
        """Wait for writes queued on this instance; the ledger overrides it."""

    async def _atomic(self, keys: list[str],
                      decide: Callable[[Pipeline], Awaitable[T]]) -> tuple[T, list]:
        """One optimistic transaction: `decide` reads (the pipeline answers at once while
        it watches `keys`), then calls `multi()` and queues its writes, or returns without
        `multi()` to write nothing. EXEC applies the writes only if no watched key changed
        since the WATCH; otherwise `decide` runs again on what is true then. WatchError
        after ATTEMPTS conflicts. (`decide`'s value, EXEC's results.)"""
        for attempt in range(ATTEMPTS):
            async with self.client.pipeline(transaction=True) as pipe:
                if keys:
                    await pipe.watch(*keys)
                value = await decide(pipe)
                if not pipe.explicit_transaction:
                    return value, []
                try:
                    return value, await pipe.execute()
                except WatchError:
                    if attempt == ATTEMPTS - 1:
                        raise
        raise AssertionError("unreachable")

    def _failed(self, error: RedisError) -> MetadataUnavailable:
        if isinstance(error, WatchError):
            return MetadataUnavailable(
                f"the metadata store (Redis at {self.url}) is too busy: a transaction met "
                f"{ATTEMPTS} concurrent writes in a row; retry")
        if not self._down:
            self._down = True
            log.warning("the metadata store (Redis at %s) is unreachable: %s", self.url, error)
        return MetadataUnavailable(
            f"the metadata store (Redis at {self.url}) is unreachable: {error}; start Redis "
            "there, or point the mirror at a Redis that runs", detail={"redis": self.url})

    def _reachable(self) -> None:
        if self._down:
            self._down = False
            log.info("the metadata store (Redis at %s) answers again", self.url)

    @guarded
    async def check(self) -> None:
        await self.client.ping()
        if self._cluster is None:  # made with a client, not connect(): start now
            await self._start()
            return
        marker = await self.client.get(self.key("cluster"))
        if marker != self._cluster:
            what = "is gone" if marker is None else "changed"
            raise MetadataLost(
                f"the metadata store (Redis at {self.url}) lost its data: the marker "
                f"{self.key('cluster')} {what}, so Redis restarted without persistence (or "
                "was flushed), and the ledger, tags and hosted repositories went with it; "
                "enable persistence (appendonly yes) in its configuration, then restart "
                "every mirror replica", detail={"redis": self.url})

    async def _final(self) -> None:
        """Write what is held in memory before the client closes; the ledger overrides it."""

    async def close(self) -> None:
        if self._closed:
            return
        await self._final()
        self._closed = True
        await self.client.aclose()
