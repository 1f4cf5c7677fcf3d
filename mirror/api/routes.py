"""The route table of the registry API, and the thin handlers of its pull side.

A request for a hosted repository (one something was pushed to) is answered from
`hosted.py`, unless the request names an upstream (`?ns=`, a path prefix); any other goes
through the pull-through cache (`proxy.py`). The push side's handlers are in `push.py`, and
which names may be pushed to is `cache/names.py`.

Every route exists twice: as `/v2/...` and under an outer path prefix `/<prefix>/v2/...`
(Docker >= 25 and containerd mirror URLs like `https://m/hub`). `{name:.+}` is greedy, so
`/v2/a/manifests/b/manifests/latest` is the name `a/manifests/b` as the spec requires.
"""

from __future__ import annotations

import bisect
import json
import re
from urllib.parse import urlencode

from aiohttp import web

from .. import logs, metrics
from ..cache.names import reserved
from ..cache.proxy import Proxy
from ..cluster import peers
from ..errors import BlobUnknown, ManifestUnknown, NameInvalid, NameUnknown, PaginationInvalid
from ..keys import ACCESS, BUDGET, HOSTED, POLICY, PROXY, ROUTER, SCANNER, SIGNATURES
from ..media import OCI_INDEX
from ..reference import TAG, Route, is_digest, parse_digest, parse_name
from ..trust.rules import HOSTED as HOSTED_SCOPE
from . import browse, push, status, tokens
from . import peers as api_peers
from .responses import fill_response, stored_response


def setup(app: web.Application) -> None:
    # Pull rules, asked before the cache or an upstream (trust/rules.py).
    r = app.router
    for base in ("/v2", "/{prefix}/v2"):
        r.add_get(f"{base}/", ping)
        r.add_get(f"{base}/_catalog", catalog)
        r.add_get(f"{base}/{{name:.+}}/tags/list", tags_list)
        r.add_get(f"{base}/{{name:.+}}/manifests/{{reference}}", manifest)
        r.add_put(f"{base}/{{name:.+}}/manifests/{{reference}}", push.put_manifest)
        r.add_delete(f"{base}/{{name:.+}}/manifests/{{reference}}", push.delete_manifest)
        r.add_post(f"{base}/{{name:.+}}/blobs/uploads/", push.start_upload)
        r.add_route("*", f"{base}/{{name:.+}}/blobs/uploads/{{upload}}", push.upload)
        r.add_get(f"{base}/{{name:.+}}/blobs/{{digest}}", blob)
        r.add_delete(f"{base}/{{name:.+}}/blobs/{{digest}}", push.delete_blob)
        r.add_get(f"{base}/{{name:.+}}/referrers/{{digest}}", referrers)
    # No /v2/ in these, so they never collide with the registry's routes.
    r.add_get("/", status.page)
    r.add_get("/status.json", status.status_json)  # every panel's data (docs/status.md)
    r.add_get("/metrics", status.metrics_text)
    r.add_get("/healthz", status.healthz)
    r.add_get("/readyz", status.readyz)
    r.add_get("/cache", browse.listing)  # the cache view (api/browse.py)
    r.add_get("/cache.json", browse.listing_json)
    r.add_get("/cache/{name:.+}", browse.repository)
    r.add_get(f"{peers.PATH}{{digest}}", api_peers.fill_stream)  # replicas only (signed)
    r.add_route("*", tokens.PATH, token)  # Bearer tokens for clients, with logins
    metrics.ROUTE_NAMES.update({
        ping: "ping", catalog: "catalog", tags_list: "tags", manifest: "manifest",
        push.put_manifest: "manifest", push.delete_manifest: "manifest", blob: "blob",
        push.delete_blob: "blob", push.start_upload: "upload", push.upload: "upload",
        referrers: "referrers", status.page: "status", status.status_json: "status",
        status.metrics_text: "metrics",
        status.healthz: "healthz", status.readyz: "readyz", token: "token",
        browse.listing: "cache", browse.listing_json: "cache", browse.repository: "cache"})


# yarl resolves dot segments and decodes %2e / %2f before routing, which would turn
# /v2/%2e%2e/x into another path; no valid name contains them, so the raw path is refused.
RAW_PATH_HOSTILE = re.compile(r"%2[eEfF]|%5[cC]|/\.{1,2}(?=/|$)|\\")


@web.middleware
async def refuse_hostile_paths(request: web.Request, handler):
    if RAW_PATH_HOSTILE.search(request.raw_path.partition("?")[0]):
        raise NameInvalid("the path contains dot segments or encoded separators, which no "
                          "repository name may contain")
    return await handler(request)


def route(request: web.Request) -> Route:
    return request.app[ROUTER].route(request.match_info["name"], ns=request.query.get("ns"),
                                     prefix=request.match_info.get("prefix"))


def names_upstream(request: web.Request) -> bool:
    """Whether the request itself picks an upstream (`?ns=`, a path prefix)."""
    return "prefix" in request.match_info or "ns" in request.query


async def hosted(request: web.Request) -> str | None:
    """The name, when the request is for a hosted repository: those win over the default
    upstream, never over a request that names an upstream, and never under a name the
    upstreams keep for themselves (one hosted before cache/names.py refused it)."""
    if names_upstream(request):
        return None
    name = parse_name(request.match_info["name"])
    if not await request.app[HOSTED].lookup(name) or reserved(name, request.app[ROUTER]):
        return None
    return name


async def token(request: web.Request) -> web.Response:
    return await request.app[ACCESS].token(request)


async def ping(request: web.Request) -> web.Response:
    if "prefix" in request.match_info:
        request.app[ROUTER].upstream_for_prefix(request.match_info["prefix"])
    return _json({})


async def manifest(request: web.Request) -> web.Response:
    reference = request.match_info["reference"]
    if is_digest(reference):
        parse_digest(reference)
    elif not TAG.fullmatch(reference):
        # No tag by that name can exist: the conformance suite wants 404, and no upstream
        # needs to be asked.
        raise ManifestUnknown(f"{reference[:200]!r} is not a valid tag, so no manifest has it")
    head = request.method == "HEAD"
    app_metrics = request.app[metrics.METRICS]
    policy = request.app[POLICY]
    if name := await hosted(request):
        policy.check(HOSTED_SCOPE, name, reference, request.remote)
        found = await request.app[HOSTED].manifest(name, reference)
        app_metrics.repositories.add(name)
        target = None
    else:
        target = route(request)
        policy.check(target.upstream.name, target.name, reference, request.remote)
        key = target.key
        app_metrics.repositories.add(key)
        lookup = app_metrics.start_lookup(key, reference)
        try:
            found = await request.app[PROXY].manifest(target, reference,
                                                      request.headers.getall("Accept", []), head)
        finally:
            hit = app_metrics.finish_lookup(lookup)
        if hit and not head:
            app_metrics.cache_bytes.labels("manifest").inc(found.size)
    if found.body is not None and policy.active:  # platforms: a HEAD has no content to judge
        await policy.check_platform(
            target.upstream.name if target else HOSTED_SCOPE, target.name if target else name,
            reference, found.digest, found.media_type, found.body,
            lambda digest: request.app[PROXY].config_blob(target, digest), request.remote)
    if target is not None and request.app[SIGNATURES].active:  # cosign: trust/signatures.py
        await request.app[SIGNATURES].check(target, reference, found, request.app[PROXY],
                                            request.remote)
    # The scanner gate last, after the rules and signatures (a webhook call is the costly
    # step): by digest, so a HEAD and a cached manifest are judged too (trust/scanner.py).
    await request.app[SCANNER].check(
        target.upstream.name if target else HOSTED_SCOPE, target.name if target else name,
        reference, found.digest, found.media_type, request.remote)
    # Exact bytes and type: no charset (aiohttp's text= would add one), and Content-Length
    # on HEAD too, or Docker abandons the mirror.
    headers = {"Content-Type": found.media_type, "Docker-Content-Digest": found.digest,
               "Content-Length": str(found.size)}
    return web.Response(body=None if head else found.body, headers=headers)


async def blob(request: web.Request) -> web.StreamResponse:
    digest = parse_digest(request.match_info["digest"])
    proxy = request.app[PROXY]
    headers = {"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream",
               "Accept-Ranges": "bytes"}
    if request.method == "HEAD":
        name = await hosted(request)  # a hosted blob's HEAD is a push's too: unchecked
        size = await (request.app[HOSTED].blob_size(name, digest) if name
                      else _blob_head(request, proxy, digest))
        return web.Response(headers={**headers, "Content-Length": str(size)})
    await _check_pull(request)
    # Held against eviction from the moment it is found stored until its last byte is out.
    hold = request.app[BUDGET].hold(digest)
    try:
        if name := await hosted(request):
            size = await request.app[HOSTED].blob_size(name, digest)
        elif (size := await proxy.stored_size(digest)) is not None:
            request.app[metrics.METRICS].cache_hits.labels("blob").inc()
            request[metrics.CACHE_HIT] = True  # its bytes are counted when it is prepared
        else:
            hold.release()
            return await _blob_fill(request, proxy, digest, headers)
    except BaseException:
        hold.release()
        raise
    target = None if name or proxy.store.remote is None else _route_or_none(request)
    try:
        return await stored_response(request, proxy, digest, size, headers, hold, target)
    except BlobUnknown:
        # Another replica evicted the object since this one last saw it: a cached blob is
        # fetched again, as on a miss (a hosted one is not evicted; a started response
        # cannot be answered twice).
        if target is None or proxy.store.remote is None or logs.response_started(request):
            raise
        return await _blob_fill(request, proxy, digest, headers)


def _route_or_none(request: web.Request) -> Route | None:
    try:
        return route(request)
    except NameUnknown:  # no upstream serves the name: nothing to fetch it again from
        return None


async def _blob_fill(request: web.Request, proxy: Proxy, digest: str,
                     headers: dict[str, str]) -> web.StreamResponse:
    """A miss: join (or start) the one fill of `digest` and stream it as it arrives."""
    app_metrics = request.app[metrics.METRICS]
    app_metrics.cache_misses.labels("blob").inc()
    if digest in proxy.fills.active:
        app_metrics.coalesced.labels("blob").inc()
    fill, fd = await proxy.blob_fill(route(request), digest)
    fill.readers += 1
    try:
        return await fill_response(request, fill, fd, headers)
    finally:
        fill.readers -= 1


async def _blob_head(request: web.Request, proxy: Proxy, digest: str) -> int:
    """The size of a blob for a HEAD that no hosted repository answers.

    Every client HEADs each blob of a repository before pushing to it. For a name that has
    nothing cached from its upstream that HEAD is answered from the store alone, so a first
    push never needs the upstream (offline, unreachable, or Docker Hub's 401 for a
    repository that does not exist). A pull HEADs blobs only after a manifest, which put
    the repository in the cache.
    """
    if names_upstream(request) or await _cached(request, proxy):
        target = route(request)  # a pull's HEAD: the rules apply (a push's finds no cache)
        request.app[POLICY].check(target.upstream.name, target.name, None, request.remote)
        return await proxy.blob_head(target, digest)
    size = await proxy.stored_size(digest)
    if size is None:
        raise BlobUnknown(f"blob {digest} is not stored here")
    return size


async def _cached(request: web.Request, proxy: Proxy) -> bool:
    """Whether the cache holds content of the request's repository from its upstream."""
    try:
        target = route(request)
    except NameUnknown:  # no default upstream: nothing is cached under this name
        return False
    return await proxy.index.has_repository(target.catalog_name)


async def _check_pull(request: web.Request) -> None:
    """The rules for a request without a tag (blob, tag list, referrers): its repository."""
    policy = request.app[POLICY]
    if name := await hosted(request):
        policy.check(HOSTED_SCOPE, name, None, request.remote)
    elif (target := _route_or_none(request)) is not None:
        policy.check(target.upstream.name, target.name, None, request.remote)
    elif policy.active:
        # No rule can be asked about a name that is neither hosted nor routed to an upstream,
        # and the blob store is shared by every name: with rules, such a name gets nothing
        # (else `/v2/nope.example/x/blobs/<digest of a denied image>` would serve it).
        route(request)  # raises NameUnknown, saying why the name is not served


async def tags_list(request: web.Request) -> web.Response:
    count = _page_size(request)
    await _check_pull(request)
    if (name := await hosted(request)) and count is not None:  # one page, read as one
        tags = await request.app[HOSTED].tags_page(name, request.query.get("last", ""),
                                                   count + 1)
    elif name:
        tags = await request.app[HOSTED].tags(name)
    else:
        tags = await request.app[PROXY].tags(route(request))
    page, link = _paginate(request, tags, count)
    return _json({"name": request.match_info["name"], "tags": page}, link)


async def catalog(request: web.Request) -> web.Response:
    if "prefix" in request.match_info:
        request.app[ROUTER].upstream_for_prefix(request.match_info["prefix"])
    count = _page_size(request)
    index, hosted_names = request.app[PROXY].index, await request.app[HOSTED].names()
    if count is None:  # every name, as asked
        names = set(await index.repository_names()) | set(hosted_names)
    else:
        # One page: the first n + 1 names after `last` of each list hold the first n + 1 of
        # both (the one past n says whether there is a next page), read through an index.
        after = request.query.get("last", "")
        start = bisect.bisect_right(hosted_names, after)
        names = set(await index.catalog_page(after, count + 1)) | \
            set(hosted_names[start:start + count + 1])
    page, link = _paginate(request, sorted(names), count)
    return _json({"repositories": page}, link)


async def referrers(request: web.Request) -> web.Response:
    digest = parse_digest(request.match_info["digest"])
    artifact_type = request.query.get("artifactType")
    await _check_pull(request)
    if name := await hosted(request):
        return _referrers_index(await request.app[HOSTED].referrers(name, digest, artifact_type),
                                artifact_type)
    try:
        target = route(request)
    except NameUnknown:
        # A name no upstream serves and nothing was pushed to: it has no referrers. (For an
        # upstream's repository its own answer is passed on, 404 included, so clients fall
        # back to the referrers tag schema where a registry has no referrers API.)
        return _referrers_index([], artifact_type)
    answer = await request.app[PROXY].referrers(target, digest, artifact_type)
    headers = {"Content-Type": answer.headers.get("Content-Type", "application/json")}
    if "OCI-Filters-Applied" in answer.headers:
        headers["OCI-Filters-Applied"] = answer.headers["OCI-Filters-Applied"]
    return web.Response(body=answer.body, headers=headers)


def _referrers_index(descriptors: list[dict], artifact_type: str | None) -> web.Response:
    headers = {"Content-Type": OCI_INDEX}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return web.Response(body=json.dumps(body).encode(), headers=headers)


def _page_size(request: web.Request) -> int | None:
    """The `n` of a paginated list, checked before anything is fetched."""
    n = request.query.get("n")
    if n is None:
        return None
    if not n.isdigit():
        raise PaginationInvalid(f"n must be a whole number, not {n[:50]!r}")
    return int(n)


def _paginate(request: web.Request, items: list[str],
              count: int | None) -> tuple[list[str], str | None]:
    """One page of a sorted list by `n` and `last` (exclusive), and the Link to the next one.

    `last` is found by bisection and only the page is copied: a later page of a repository
    with 10,000 tags costs what the first does. The Link keeps the path the client used
    (its prefix) and its `ns`, so following it routes exactly like the first request did.
    """
    last = request.query.get("last")
    start = bisect.bisect_right(items, last) if last is not None else 0
    if count is None:
        return items[start:], None
    page = items[start:start + count]
    if count == 0 or len(items) - start <= count:
        return page, None
    query = {"n": count, "last": page[-1]}
    if "ns" in request.query:
        query["ns"] = request.query["ns"]
    return page, f'<{request.path}?{urlencode(query)}>; rel="next"'


def _json(document: object, link: str | None = None) -> web.Response:
    headers = {"Content-Type": "application/json"}
    if link is not None:
        headers["Link"] = link
    return web.Response(body=json.dumps(document).encode(), headers=headers)
