"""The pull-through policy: what is answered locally, what is asked upstream, and when.

- Content by digest (manifests and blobs) is immutable: once stored it is served as stored,
  and never revalidated.
- A tag is answered from its record for `tag_ttl` with no upstream request at all. After
  that it is revalidated with a HEAD (Docker Hub does not count HEADs against its pull rate
  limit) and the manifest is fetched by digest only when the digest changed.
- When the upstream is down, answers 5xx or 429, the last known answer for a tag (or tag
  list) is served and the fact logged: stale-if-error.
- Tag records are kept per Accept class. A client that accepts no index must never
  overwrite the index answer for a tag, or arm64 nodes would be handed amd64 images.
- A blob miss joins the one fill of that digest (fill.py); a HEAD of a missing blob asks
  the upstream for a HEAD only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Awaitable
from urllib.parse import urlencode

from ..cluster.fills import FillLeases
from ..errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    StorageError,
    TooManyRequests,
    Unavailable,
)
from ..media import (
    ALL_TYPES,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    LIST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from ..reference import Route, is_digest, parse_digest
from ..storage.blobs import BlobStore
from ..storage.index import Index, TagRecord
from ..upstream.client import Answer, Upstream
from .fill import Fill
from .fills import Fills
from .flights import Flights
from .objects import object_body
from .shared import shared_fill

log = logging.getLogger("mirror")

MAX_TAG_PAGES = 1000
STALE_RETRY_SECONDS = 30.0


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    size: int
    body: bytes | None  # None for an answer to HEAD known only from a tag record


def accepted_types(accept: list[str]) -> set[str] | None:
    """The media types a client accepts; None when it accepts anything."""
    types = {part.split(";")[0].strip() for line in accept for part in line.split(",")}
    types.discard("")
    if not types or "*/*" in types:
        return None
    return types


def accept_class(types: set[str] | None) -> str:
    return "index" if types is None or types & LIST_TYPES else "manifest"


def acceptable(media_type: str, types: set[str] | None) -> bool:
    return types is None or media_type in types


class Proxy:
    def __init__(self, upstreams: dict[str, Upstream], index: Index, store: BlobStore,
                 fills: Fills, offline: bool = False, cluster: FillLeases | None = None):
        self.upstreams = upstreams
        self.index = index
        self.store = store
        self.usage = store.usage
        self.fills = fills
        self.offline = offline
        self.cluster = cluster  # with several replicas: who fetches which digest
        self._flights = Flights()
        # After a failed revalidation a tag is served stale without asking again until
        # this time, so a down upstream is not asked (nor the failure logged) per request.
        self._stale_until: dict[tuple[str, str, str], float] = {}

    def _upstream(self, route: Route) -> Upstream:
        if self.offline:
            # Like an upstream that is down: tags are served stale, misses are 503.
            raise Unavailable(f"this mirror is offline (server.offline = true): {route.key} "
                              "is answered only from what it holds")
        return self.upstreams[route.upstream.name]

    # Manifests.
    async def manifest(self, route: Route, reference: str, accept: list[str],
                       head: bool) -> Manifest:
        if is_digest(reference):
            return await self._by_digest(route, reference)
        types = accepted_types(accept)
        forward = list(accept) if types is not None else ALL_TYPES
        cls = accept_class(types)
        record = await self.index.tag(route.key, reference, cls)
        if record is None or not acceptable(record.media_type, types):
            return await self._once(
                ("tag", route.key, reference, cls, head),
                lambda: self._refresh_tag(route, reference, cls, forward, head),
                lambda: self._stored_tag(route, reference, cls, types, head))
        if not record.fresh(route.upstream.tag_ttl) and \
                self._stale_until.get((route.key, reference, cls), 0) < time.monotonic():
            record = await self._once(
                ("revalidate", route.key, reference, cls),
                lambda: self._revalidate(route, reference, cls, forward, record),
                lambda: self._fresh_record(route, reference, cls))
        if head:
            self.usage.touch(record.digest)
            return Manifest(record.digest, record.media_type, record.size, None)
        return await self._by_digest(route, record.digest)

    async def _refresh_tag(self, route: Route, tag: str, cls: str, accept: list[str],
                           head: bool) -> Manifest:
        manifest = await self._fetch_manifest(route, tag, accept, head)
        await self._keep(self.index.put_tag(route.key, tag, cls, TagRecord(
            manifest.digest, manifest.media_type, manifest.size, time.time())))
        return manifest

    async def _revalidate(self, route: Route, tag: str, cls: str, accept: list[str],
                          record: TagRecord) -> TagRecord:
        try:
            manifest = await self._refresh_tag(route, tag, cls, accept, head=True)
        except (Unavailable, TooManyRequests) as e:
            log.warning("serving %s:%s stale (checked %.0fs ago): %s", route.key, tag,
                        time.time() - record.checked_at, e.message)
            self._stale_until[(route.key, tag, cls)] = \
                time.monotonic() + min(route.upstream.tag_ttl, STALE_RETRY_SECONDS)
            return record
        except ManifestUnknown:
            await self.index.drop_tag(route.key, tag, cls)
            raise
        self._stale_until.pop((route.key, tag, cls), None)
        if manifest.digest != record.digest:
            log.info("%s:%s moved from %s to %s", route.key, tag, record.digest, manifest.digest)
        return await self.index.tag(route.key, tag, cls) or record

    async def _by_digest(self, route: Route, digest: str) -> Manifest:
        found = await self.index.manifest(digest)
        if found is not None:
            self.usage.touch(digest)
            media_type, body = found
            return Manifest(digest, media_type, len(body), body)
        return await self._once(
            ("digest", digest), lambda: self._fetch_manifest(route, digest, ALL_TYPES, False),
            lambda: self._stored_manifest(digest))

    async def _once(self, key: tuple, fetch, stored):
        """One fetch per key in this process (Flights) and, with several replicas, in the
        cluster: a replica that finds another fetching waits and reads what it stored."""
        if self.cluster is None:
            return await self._flights.run(key, fetch)
        name = ":".join(map(str, key))
        return await self._flights.run(key, lambda: self.cluster.once(name, fetch, stored))

    async def _stored_tag(self, route: Route, tag: str, cls: str, types,
                          head: bool) -> Manifest | None:
        record = await self.index.tag(route.key, tag, cls)
        if record is None or not acceptable(record.media_type, types):
            return None
        if head:
            return Manifest(record.digest, record.media_type, record.size, None)
        return await self._stored_manifest(record.digest)

    async def _fresh_record(self, route: Route, tag: str, cls: str) -> TagRecord | None:
        record = await self.index.tag(route.key, tag, cls)
        return record if record is not None and record.fresh(route.upstream.tag_ttl) else None

    async def _stored_manifest(self, digest: str) -> Manifest | None:
        found = await self.index.manifest(digest)
        if found is None:
            return None
        media_type, body = found
        return Manifest(digest, media_type, len(body), body)

    async def _fetch_manifest(self, route: Route, reference: str, accept: list[str],
                              head: bool) -> Manifest:
        """Ask the upstream; verify and store what a GET returns."""
        upstream = self._upstream(route)
        answer = await upstream.fetch("HEAD" if head else "GET",
                                      f"/v2/{route.name}/manifests/{reference}",
                                      name=route.name, not_found=ManifestUnknown, accept=accept)
        header_digest = answer.headers.get("Docker-Content-Digest")
        if head:
            length = answer.headers.get("Content-Length", "")
            if header_digest and length.isdigit() and "Content-Type" in answer.headers:
                return Manifest(parse_digest(header_digest), _media_type(answer),
                                int(length), None)
            # Some registries answer HEAD without a digest: a GET tells us everything.
            return await self._fetch_manifest(route, reference, accept, head=False)
        media_type = _media_type(answer)
        body = answer.body
        expected = reference if is_digest(reference) else header_digest
        algorithm = (expected or "sha256:").partition(":")[0]
        computed = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}" \
            if algorithm in ("sha256", "sha512") else None
        if expected is not None and computed != expected:
            # A signed schema1 manifest's digest is that of its payload without the
            # signatures: the upstream's header is the only source for it.
            if not (media_type == DOCKER_SCHEMA1_SIGNED and header_digest == expected):
                raise Unavailable(f"upstream {upstream.name} sent a manifest for "
                                  f"{route.name}:{reference} that does not match {expected}")
        digest = parse_digest(expected or computed)
        if await self._keep(self.index.put_manifest(digest, media_type, body)):
            await self._keep(self.index.add_repository(route.catalog_name))
        return Manifest(digest, media_type, len(body), body)

    async def _keep(self, write: Awaitable[None]) -> bool:
        """Store what was fetched; a full disk (or a metadata store that is down) must not
        fail the client's pull (the answer is verified and served, just not kept), so it is
        logged instead. Whether it was kept."""
        try:
            await write
        except StorageError as e:  # a full disk, an unreachable Redis or object store
            log.error("not cached: %s", e.message)
            return False
        return True

    # Blobs.
    async def stored_size(self, digest: str) -> int | None:
        """The size of a committed blob (a hit, which refreshes its clock), or None: its
        local file, else (with S3) its object."""
        size = await self.store.stat(digest)
        if size is not None:
            self.usage.touch(digest)
        return size

    def store_fill(self, digest: str, route: Route | None = None) -> tuple[Fill, int]:
        """Join (or start) the fill of the local tier from the object store's copy: its
        readers get the bytes as they arrive, checked against the digest again. With a
        route, the upstream is the fill's next source: another replica may have evicted
        the object since this one saw it, and the fill then goes on from there."""
        fill, fd = self.fills.join(digest, lambda start: object_body(self.store, digest, start),
                                   route="the object store")
        if route is not None and not self.offline:
            upstream = self._upstream(route)
            fill.add_source(route.key, lambda start: upstream.blob(route.name, digest, start))
        return fill, fd

    async def blob_fill(self, route: Route, digest: str) -> tuple[Fill, int]:
        """Join (or start) the fill of a missing blob; the descriptor reads its spool.

        The route comes along: should the route the fill reads from fail (a bogus name, a
        down upstream), the fill goes on through this one (fill.py). With several replicas
        a new fill first asks the cluster who fetches the digest (cluster/fills.py)."""
        upstream = self._upstream(route)

        def from_upstream(start: int):
            return upstream.blob(route.name, digest, start)

        if self.cluster is None or digest in self.fills.active:
            return self.fills.join(digest, from_upstream, route=route.key)
        return await shared_fill(self.cluster, self.fills, self.store, route, digest,
                                 from_upstream)

    async def blob_head(self, route: Route, digest: str) -> int:
        """The size of a blob, asking the upstream for a HEAD (never a body) on a miss."""
        size = await self.stored_size(digest)
        if size is not None:
            return size
        fill = self.fills.active.get(digest)
        if fill is not None and fill.size is not None:
            return fill.size
        upstream = self._upstream(route)
        answer = await upstream.fetch("HEAD", f"/v2/{route.name}/blobs/{digest}",
                                      name=route.name, not_found=BlobUnknown)
        length = answer.headers.get("Content-Length", "")
        if not length.isdigit():
            raise Unavailable(f"upstream {upstream.name} sent no Content-Length for {digest}")
        return int(length)

    async def config_blob(self, route: Route | None, digest: str) -> bytes:
        """A manifest's config, for the platform rules (trust/rules.py): the stored blob,
        else the upstream's answer, not stored (the client's own GET of it fills the cache).
        Without a route (a hosted repository) only the store is asked."""
        try:
            return self.store.path(digest).read_bytes()  # a config is a few KiB
        except FileNotFoundError:
            if route is None:
                raise BlobUnknown(f"the config {digest} is not stored here") from None
        upstream = self._upstream(route)
        answer = await upstream.fetch("GET", f"/v2/{route.name}/blobs/{digest}",
                                      name=route.name, not_found=BlobUnknown, limit=1 << 20)
        algorithm, _, encoded = digest.partition(":")
        if hashlib.new(algorithm, answer.body).hexdigest() != encoded:
            # A platform decided from bytes the digest does not name would be the
            # upstream's word, not the image's.
            raise Unavailable(f"upstream {upstream.name} sent a config for {route.name} "
                              f"that does not match {digest}")
        return answer.body

    # Tag lists and referrers.
    async def tags(self, route: Route) -> list[str]:
        cached = await self.index.tag_list(route.key)
        if cached is not None and time.time() - cached[1] < route.upstream.tag_ttl:
            return cached[0]
        try:
            return await self._flights.run(("tags", route.key), lambda: self._fetch_tags(route))
        except (Unavailable, TooManyRequests) as e:
            if cached is None:
                raise
            log.warning("serving the tag list of %s stale: %s", route.key, e.message)
            return cached[0]

    async def _fetch_tags(self, route: Route) -> list[str]:
        """The upstream's whole tag list, following its own pagination; we paginate locally."""
        upstream = self._upstream(route)
        path, tags = f"/v2/{route.name}/tags/list", set()
        for _ in range(MAX_TAG_PAGES):
            answer = await upstream.fetch("GET", path, name=route.name, not_found=NameUnknown)
            try:
                page = json.loads(answer.body).get("tags") or []
                if not isinstance(page, list):
                    raise ValueError("tags is not a list")
            except (ValueError, AttributeError, RecursionError):
                raise Unavailable(f"upstream {upstream.name} sent an unreadable tag list") from None
            tags.update(t for t in page if isinstance(t, str))
            path = _next_link(answer, f"/v2/{route.name}/tags/list")
            if path is None:
                break
        result = sorted(tags)
        if await self._keep(self.index.put_tag_list(route.key, result)):
            await self._keep(self.index.add_repository(route.catalog_name))
        return result

    async def referrers(self, route: Route, digest: str, artifact_type: str | None) -> Answer:
        upstream = self._upstream(route)
        path = f"/v2/{route.name}/referrers/{digest}"
        if artifact_type is not None:
            path += "?" + urlencode({"artifactType": artifact_type})
        return await upstream.fetch("GET", path, name=route.name, not_found=ManifestUnknown,
                                    accept=[OCI_INDEX])


def _media_type(answer: Answer) -> str:
    media_type = answer.headers.get("Content-Type", "").split(";")[0].strip()
    if media_type and media_type not in ("application/json", "text/plain"):
        return media_type
    try:  # an upstream that sends no useful Content-Type: the manifest says what it is
        document = json.loads(answer.body)
        declared = document.get("mediaType")
        if isinstance(declared, str):
            return declared
        if document.get("schemaVersion") == 1:
            return DOCKER_SCHEMA1_SIGNED if "signatures" in document else DOCKER_SCHEMA1
    except (ValueError, AttributeError, RecursionError):  # RecursionError: absurd nesting
        pass
    return media_type or OCI_MANIFEST


def _next_link(answer: Answer, expected_path: str) -> str | None:
    """The path of an upstream's `Link: <...>; rel="next"`, if it stays on the same list.

    RFC 8288: one header may hold several links (`<..>; rel="prev", <..>; rel="next"`, as
    Distribution's and Harbor's later pages do), and `rel` may be unquoted or name several
    relations. Taking the first link whatever its rel went back to the previous page: 1000
    requests and the last pages' tags lost."""
    for link in _LINK_SPLIT.split(answer.headers.get("Link", "")):
        match = _LINK.match(link)
        rel = _REL.search(match.group(2)) if match else None
        if rel is None or "next" not in (rel.group(1) or rel.group(2)).lower().split():
            continue
        target = match.group(1)
        if "://" in target:
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        return target if target.split("?")[0] == expected_path else None
    return None


_LINK_SPLIT = re.compile(r",(?=\s*<)")
_LINK = re.compile(r"\s*<([^>]*)>(.*)", re.DOTALL)
_REL = re.compile(r';\s*rel\s*=\s*(?:"([^"]*)"|([^\s;,]*))', re.IGNORECASE)
