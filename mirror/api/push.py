"""Handlers of the push and management API for hosted repositories (distribution-spec v1.1).

Uploads: POST starts one (or finishes it at once with `?digest=`, or mounts a blob the
mirror already holds with `?mount=&from=`); PATCH appends a chunk (`Content-Range` must
start where the upload ends, else 416); GET reports progress (204 with `Range`); PUT with
`?digest=` finishes it; DELETE cancels it. Manifests are validated before they are stored:
every blob or manifest they reference must be in the repository. Which names may be
pushed to at all is `cache/names.py`'s policy: never one the default upstream serves.
"""

from __future__ import annotations

from aiohttp import web

from ..cache import names
from ..errors import BlobUploadInvalid, DigestInvalid, ManifestTooLarge, SizeInvalid, Unsupported
from ..keys import HOSTED, PROXY, ROUTER, UPLOADS
from ..reference import parse_digest, parse_name, parse_reference, parse_tag

MAX_MANIFEST = 4 << 20  # as Distribution: larger manifests are refused with 413


async def pushable(request: web.Request) -> str:
    """The repository name of a push request, if it may receive pushes (cache/names.py)."""
    name = parse_name(request.match_info["name"])
    if "prefix" in request.match_info or "ns" in request.query:
        raise Unsupported(f"{request.path} is routed to an upstream registry, which is "
                          "read-only here; push to /v2/<name> without ?ns= instead")
    hosted = request.app[HOSTED]
    known = await hosted.lookup(name)  # before the name rules, which differ for known names
    hosted.check_pushable(name)
    if not known:
        await names.check_not_cached(name, request.app[ROUTER], request.app[PROXY].index)
    return name


async def start_upload(request: web.Request) -> web.Response:
    name = await pushable(request)
    hosted, uploads = request.app[HOSTED], request.app[UPLOADS]
    if "mount" in request.query:
        digest = parse_digest(request.query["mount"])
        if await hosted.mount(name, digest, request.query.get("from")) is not None:
            return _blob_created(name, digest)
    digest = parse_digest(request.query["digest"]) if "digest" in request.query else None
    upload = await uploads.start(name, client=request.remote)
    if digest is not None:  # monolithic: POST with the whole blob
        try:
            await uploads.append(name, upload, request.content, None, request.content_length)
            return await _finish(request, name, upload, digest)
        finally:
            await uploads.cancel(name, upload)  # finished or failed: no upload record stays behind
    return web.Response(status=202, headers=uploads.range_headers(name, upload, 0))


async def upload(request: web.Request) -> web.Response:
    name = await pushable(request)
    uploads, upload_id = request.app[UPLOADS], request.match_info["upload"]
    if request.method == "GET":
        offset = await uploads.offset(name, upload_id)
        return web.Response(status=204, headers=uploads.range_headers(name, upload_id, offset))
    if request.method == "PATCH":
        offset = await uploads.append(name, upload_id, request.content,
                                      request.headers.get("Content-Range"),
                                      request.content_length)
        return web.Response(status=202, headers=uploads.range_headers(name, upload_id, offset))
    if request.method == "PUT":
        if "digest" not in request.query:
            raise DigestInvalid("finishing an upload needs ?digest=<digest of the blob>")
        digest = parse_digest(request.query["digest"])
        await uploads.append(name, upload_id, request.content, request.headers.get("Content-Range"),
                             request.content_length)
        return await _finish(request, name, upload_id, digest)
    if request.method == "DELETE":
        await uploads.offset(name, upload_id)
        await uploads.cancel(name, upload_id)
        return web.Response(status=204)
    raise Unsupported(f"{request.method} is not part of the upload API")


async def _finish(request: web.Request, name: str, upload: str, digest: str) -> web.Response:
    await request.app[UPLOADS].finish(name, upload, digest)
    if await request.app[HOSTED].link_blob(name, digest) is None:
        raise BlobUploadInvalid(f"{digest} was removed from storage while it was being "
                                "linked; push it again")
    return _blob_created(name, digest)


def _blob_created(name: str, digest: str) -> web.Response:
    return web.Response(status=201, headers={"Location": f"/v2/{name}/blobs/{digest}",
                                             "Docker-Content-Digest": digest})


async def put_manifest(request: web.Request) -> web.Response:
    name = await pushable(request)
    reference = parse_reference(request.match_info["reference"])
    if (request.content_length or 0) > MAX_MANIFEST:
        raise ManifestTooLarge(f"manifests are limited to {MAX_MANIFEST} bytes")
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_MANIFEST:
            raise ManifestTooLarge(f"manifests are limited to {MAX_MANIFEST} bytes")
    if request.content_length is not None and len(body) != request.content_length:
        raise SizeInvalid("the body is shorter than its Content-Length")
    tags = [parse_tag(t) for t in request.query.getall("tag", [])]
    digest, subject = await request.app[HOSTED].put_manifest(
        name, reference, request.headers.get("Content-Type", ""), bytes(body), tags)
    headers = {"Location": f"/v2/{name}/manifests/{digest}", "Docker-Content-Digest": digest}
    if subject is not None:
        headers["OCI-Subject"] = subject
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    name = await pushable(request)
    reference = parse_reference(request.match_info["reference"])
    await request.app[HOSTED].delete_manifest(name, reference)
    return web.Response(status=202)


async def delete_blob(request: web.Request) -> web.Response:
    name = await pushable(request)
    await request.app[HOSTED].delete_blob(name, parse_digest(request.match_info["digest"]))
    return web.Response(status=202)
