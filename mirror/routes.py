"""The route table of the registry API, and thin handlers that parse, call the proxy, answer.

Every route exists twice: as `/v2/...` and under an outer path prefix `/<prefix>/v2/...`
(Docker >= 25 and containerd mirror URLs like `https://m/hub`). `{name:.+}` is greedy, so
`/v2/a/manifests/b/manifests/latest` is the name `a/manifests/b` as the spec requires.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlencode

from aiohttp import web

from .errors import NameInvalid, PaginationInvalid, Unsupported
from .keys import PROXY, ROUTER
from .reference import Route, parse_digest, parse_name, parse_reference
from .responses import file_response, fill_response


def setup(app: web.Application) -> None:
    r = app.router
    for base in ("/v2", "/{prefix}/v2"):
        r.add_get(f"{base}/", ping)
        r.add_get(f"{base}/_catalog", catalog)
        r.add_get(f"{base}/{{name:.+}}/tags/list", tags_list)
        r.add_get(f"{base}/{{name:.+}}/manifests/{{reference}}", manifest)
        r.add_route("*", f"{base}/{{name:.+}}/blobs/uploads/{{upload:.*}}", read_only)
        r.add_get(f"{base}/{{name:.+}}/blobs/{{digest}}", blob)
        r.add_get(f"{base}/{{name:.+}}/referrers/{{digest}}", referrers)
        for method in ("PUT", "DELETE"):
            r.add_route(method, f"{base}/{{name:.+}}/manifests/{{reference}}", read_only)
        r.add_delete(f"{base}/{{name:.+}}/blobs/{{digest}}", read_only)


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


async def ping(request: web.Request) -> web.Response:
    if "prefix" in request.match_info:
        request.app[ROUTER].upstream_for_prefix(request.match_info["prefix"])
    return _json({})


async def manifest(request: web.Request) -> web.Response:
    target = route(request)
    reference = parse_reference(request.match_info["reference"])
    head = request.method == "HEAD"
    found = await request.app[PROXY].manifest(target, reference,
                                              request.headers.getall("Accept", []), head)
    # Exact bytes and type: no charset (aiohttp's text= would add one), and Content-Length
    # on HEAD too, or Docker abandons the mirror.
    headers = {"Content-Type": found.media_type, "Docker-Content-Digest": found.digest,
               "Content-Length": str(found.size)}
    return web.Response(body=None if head else found.body, headers=headers)


async def blob(request: web.Request) -> web.StreamResponse:
    target = route(request)
    digest = parse_digest(request.match_info["digest"])
    proxy = request.app[PROXY]
    headers = {"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream",
               "Accept-Ranges": "bytes"}
    if request.method == "HEAD":
        size = await proxy.blob_head(target, digest)
        return web.Response(headers={**headers, "Content-Length": str(size)})
    size = proxy.blob_size(digest)
    if size is not None:
        return await file_response(request, proxy.store.path(digest), size, headers)
    fill, fd = proxy.blob_fill(target, digest)
    return await fill_response(request, fill, fd, headers)


async def tags_list(request: web.Request) -> web.Response:
    target = route(request)
    count = _page_size(request)
    tags = await request.app[PROXY].tags(target)
    page, link = _paginate(request, tags, count)
    return _json({"name": request.match_info["name"], "tags": page}, link)


async def catalog(request: web.Request) -> web.Response:
    if "prefix" in request.match_info:
        request.app[ROUTER].upstream_for_prefix(request.match_info["prefix"])
    count = _page_size(request)
    names = request.app[PROXY].index.repository_names()
    page, link = _paginate(request, names, count)
    return _json({"repositories": page}, link)


async def referrers(request: web.Request) -> web.Response:
    target = route(request)
    digest = parse_digest(request.match_info["digest"])
    answer = await request.app[PROXY].referrers(target, digest,
                                               request.query.get("artifactType"))
    headers = {"Content-Type": answer.headers.get("Content-Type", "application/json")}
    if "OCI-Filters-Applied" in answer.headers:
        headers["OCI-Filters-Applied"] = answer.headers["OCI-Filters-Applied"]
    return web.Response(body=answer.body, headers=headers)


async def read_only(request: web.Request) -> web.Response:
    name = parse_name(request.match_info["name"])
    raise Unsupported(f"{request.method} is not supported for {name}: it is served from an "
                      "upstream registry through this pull-through cache, which is read-only")


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

    The Link keeps the path the client used (its prefix) and its `ns`, so following it
    routes exactly like the first request did.
    """
    last = request.query.get("last")
    if last is not None:
        items = [item for item in items if item > last]
    if count is None:
        return items, None
    page = items[:count]
    if count == 0 or len(items) <= count:
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
