"""Blob responses: Range requests by RFC 9110 section 14, a committed file by sendfile, and a
fill streamed to the client as it grows — never with a byte whose digest did not check out.

Which answer a Range gets, the same for a cached blob and for one still filling:

- no Range, or one to ignore → 200 with the whole blob. Ignored (RFC 9110 14.2): a unit
  other than `bytes`, a syntactically invalid range set (`bytes=5-1`, garbage), and more
  than `limits.max_ranges` ranges (podman's zstd:chunked must never get 416 for a
  multi-range request; a 200 is a valid answer it reads by skipping);
- ranges that are syntactically valid but none lies within the blob → 416 with
  `Content-Range: bytes */SIZE` and OCI error JSON;
- otherwise 206, one range plain, several as `multipart/byteranges`. Ranges in ascending
  order that do not overlap are sent exactly as asked, one part each (containers/image
  demands one part per range it asked for); any other set (overlapping, out of order) is
  coalesced into sorted, merged ranges (RFC 9110 15.3.7.2), so 16 × `0-` is one range, and
  a response is never larger than the blob plus its part headers.

A blob still filling is served from verified bytes only: a whole body or a range that ends
at the blob's end streams as the spool grows (the fill holds its last byte back until the
digest checked out); any other range waits until the fill is verified and then is sent, so
no client receives a complete 206 containing a byte that turns out to be wrong.

Bodies go out by `loop.sendfile` (the kernel's sendfile, or asyncio's fallback that reads
on a thread under TLS), part by part, so a multi-range response never reads a file on the
event loop and other requests are answered between its writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
import weakref
from collections.abc import Awaitable, Callable
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from aiohttp import web

from ..cache.fill import Fill, FillFailed
from ..errors import BlobUnknown, RangeInvalid, Unavailable
from ..keys import CONFIG
from ..storage.blobs import BlobStore
from ..storage.s3_io import ObjectMissing, ObjectStoreUnavailable

if TYPE_CHECKING:
    from ..cache.proxy import Proxy
    from ..reference import Route

log = logging.getLogger("mirror")

# One range-spec of RFC 9110 14.1.1 (int-range or suffix-range); ASCII digits only, as the
# grammar's DIGIT is (Python's \d would take other scripts' digits too).
RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")
# Numbers longer than this are larger than any blob: compared as text, never int()-ed (a
# 5000-digit number is past Python's int conversion limit).
MAX_DIGITS = 18
READ_CHUNK = 1 << 20

Ranges = list[tuple[int, int]]  # [start, end) byte offsets


def parse_ranges(header: str, size: int, max_ranges: int = 16) -> Ranges | None:
    """The [start, end) ranges to send for a Range header, in the order to send them; None
    means "ignore it, send the whole blob". Raises RangeInvalid (416) when the header is
    valid but no range lies within the blob's `size` bytes; never anything else."""
    unit, equals, range_set = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None  # RFC 9110 14.2: an unknown range unit is ignored
    # A list element may be empty and is then skipped (RFC 9110 5.6.1).
    specs = [spec.strip(" \t") for spec in range_set.split(",")]
    specs = [spec for spec in specs if spec]
    if not specs or len(specs) > max_ranges or size == 0:
        # Too many ranges: the whole blob is a valid answer and cannot be abused. An empty
        # blob has no byte to select: its whole (empty) body is the answer.
        return None
    ranges: Ranges = []
    for spec in specs:
        m = RANGE_SPEC.fullmatch(spec)
        if m is None or m.group(1) == m.group(2) == "":
            return None  # an invalid range set is ignored as a whole
        first, last = _digits(m.group(1)), _digits(m.group(2))
        if m.group(1):
            if m.group(2) and _less(last, first):
                return None  # int-range with last-pos < first-pos: invalid
            start = _number(first)
            end = min(_number(last) + 1, size) if m.group(2) else size
        else:  # suffix-range: the last N bytes
            start, end = max(size - _number(last), 0), size
        if start < end:  # an unsatisfiable range (past the end, suffix of 0) is left out
            ranges.append((start, end))
    if not ranges:
        raise RangeInvalid(f"no requested range lies within the blob's {size} bytes",
                           headers={"Content-Range": f"bytes */{size}"})
    if all(a[1] <= b[0] for a, b in pairwise(ranges)):
        return ranges
    return _coalesce(ranges)


def _digits(text: str) -> str:
    return text.lstrip("0") or "0"


def _number(digits: str) -> int:
    """A digit string as an int, capped: anything past MAX_DIGITS is beyond every blob."""
    return int(digits) if len(digits) <= MAX_DIGITS else 10 ** MAX_DIGITS


def _less(a: str, b: str) -> bool:
    """a < b for digit strings without leading zeros, at any length."""
    return (len(a), a) < (len(b), b)


def _coalesce(ranges: Ranges) -> Ranges:
    merged: Ranges = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:  # overlapping or adjacent
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _ranges(request: web.Request, size: int) -> Ranges | None:
    header = request.headers.get("Range")
    if header is None:
        return None
    return parse_ranges(header, size, request.app[CONFIG].limits.max_ranges)


async def stored_response(request: web.Request, proxy: Proxy, digest: str, size: int,
                          headers: dict[str, str], hold: Releasable,
                          route: Route | None = None) -> web.StreamResponse:
    """A stored blob: from its local file by sendfile; else (S3) a redirect to the object,
    a fill of the local tier from it, or the object's bytes streamed through."""
    store = proxy.store
    if store.remote is None or store.size(digest) is not None:
        return await file_response(request, store.path(digest), size, headers, hold)
    try:
        if request.app[CONFIG].storage.s3.redirect:
            url = await store.remote.presign_get(store.object_name(digest))
            return web.Response(status=307, headers={**headers, "Location": url})
        if store.tier is None:
            return await object_response(request, store, digest, size, headers)
    finally:
        hold.release()
    fill, fd = proxy.store_fill(digest, route)  # into the local tier, read by every reader as it grows
    fill.readers += 1
    try:
        return await fill_response(request, fill, fd, headers)
    finally:
        fill.readers -= 1


async def file_response(request: web.Request, path: Path, size: int,
                        headers: dict[str, str], hold: Releasable | None = None
                        ) -> web.StreamResponse:
    """A committed blob: no Range is FileResponse's sendfile; a Range we answer ourselves,
    since FileResponse would apply its own rules (416 for multi-range and for invalid
    ranges that RFC 9110 says to ignore). `hold` (the budget's claim against eviction,
    taken when the blob was found) is released once the last byte is out."""
    if "Range" not in request.headers:
        return HeldFileResponse(path, hold, headers=headers)
    try:
        return await _ranged_file(request, path, size, headers)
    finally:
        if hold is not None:
            hold.release()


class Releasable(Protocol):
    def release(self) -> None: ...


class HeldFileResponse(web.FileResponse):
    """A FileResponse that keeps a hold (the blob, against eviction) until it is sent:
    aiohttp sends it in prepare(), after the handler returned. One that is never sent (the
    client left first) releases it when it is collected."""

    def __init__(self, path: Path, hold: Releasable | None, **kwargs: Any):
        super().__init__(path, **kwargs)
        self._hold = hold
        if hold is not None:
            weakref.finalize(self, hold.release)

    async def prepare(self, request: web.BaseRequest):
        try:
            return await super().prepare(request)
        finally:
            if self._hold is not None:
                self._hold.release()


async def _ranged_file(request: web.Request, path: Path, size: int,
                       headers: dict[str, str]) -> web.StreamResponse:
    ranges = _ranges(request, size)
    try:
        file = open(path, "rb")
    except FileNotFoundError:  # evicted since its size was looked up
        raise BlobUnknown(f"blob {headers.get('Docker-Content-Digest')} is no longer stored") \
            from None
    with file:
        async def send(response: web.StreamResponse, start: int, end: int) -> None:
            await _sendfile(request, file, start, end)

        return await _respond(request, headers, size, ranges or [(0, size)],
                              ranges is not None, send)


async def fill_response(request: web.Request, fill: Fill, fd: int,
                        headers: dict[str, str]) -> web.StreamResponse:
    """A blob still arriving from upstream, sent from the spool as its verified bytes exist.

    Bytes go out by sendfile straight from the spool file, so memory does not grow with the
    blob or with the number of readers. If the fill fails after the headers went out, the
    connection is closed before Content-Length bytes were sent: the client sees a short
    body, never a whole one. If it fails before (a range waiting for verification), the
    client gets 503 with OCI error JSON.
    """
    with open(fd, "rb") as spool:
        await fill.started()
        ranges = None
        if "Range" in request.headers:
            size = fill.size if fill.size is not None else await _verified(fill)
            ranges = _ranges(request, size)
            if ranges is not None and not (len(ranges) == 1 and ranges[0][1] == size):
                # A range that ends before the blob's end would be complete before the
                # digest is known: it waits until the fill is verified.
                await _verified(fill)
        if fill.size == 0:
            await _verified(fill)  # an empty body is complete at once: only once verified

        async def send(response: web.StreamResponse, start: int, end: int | None) -> None:
            await _send_fill(request, response, fill, spool, start, end)

        return await _respond(request, headers, fill.size, ranges or [(0, fill.size)],
                              ranges is not None, send)


async def object_response(request: web.Request, store: BlobStore, digest: str, size: int,
                          headers: dict[str, str]) -> web.StreamResponse:
    """A blob kept only in the object store (S3, no local tier), streamed through with the
    client's Range passed on. The first range is opened before any header goes out, so an
    object store that is down or lost the object is a clean 503 or 404; a read that breaks
    later ends the response short, as a failed fill does."""
    assert store.remote is not None
    ranges = _ranges(request, size)
    wanted = ranges or [(0, size)]
    name = store.object_name(digest)

    async def open_range(start: int, end: int):
        try:
            return await store.remote.read(name, start, end - 1)
        except ObjectMissing:
            store.forget_remote(digest)
            raise BlobUnknown(f"blob {digest} is no longer in the object store") from None

    first = await open_range(*wanted[0]) if size else None

    async def send(response: web.StreamResponse, start: int, end: int | None) -> None:
        nonlocal first
        if end is None or end <= start:
            return
        body, first = (first, None) if first is not None else (await open_range(start, end),
                                                                None)
        try:
            async for chunk in body:
                await response.write(chunk)
        except (ObjectStoreUnavailable, ObjectMissing) as e:
            raise FillFailed(f"the object store's read broke off: {e}") from e
        finally:
            await body.close()

    try:
        return await _respond(request, headers, size, wanted, ranges is not None, send)
    finally:
        if first is not None:
            await first.close()


async def _verified(fill: Fill) -> int:
    """Wait until the fill's digest checked out; its size. Unavailable if it never does."""
    try:
        if fill.size:
            # The last byte becomes readable only once the digest checked out.
            await fill.readable(fill.size - 1, fill.size)
        else:  # size unknown (a chunked upstream) or zero: follow it to its end
            offset = 0
            while (limit := await fill.readable(offset, None)) > offset:
                offset = limit
    except FillFailed as e:
        raise Unavailable(f"the upstream's copy of {fill.digest} failed verification or "
                          f"broke off: {e}") from None
    return fill.size if fill.size is not None else offset


Send = Callable[[web.StreamResponse, int, "int | None"], Awaitable[None]]


async def _respond(request: web.Request, headers: dict[str, str], size: int | None,
                   ranges: list[tuple[int, int | None]], partial: bool,
                   send: Send) -> web.StreamResponse:
    """Headers, then each range's bytes by `send`: 200, a 206, or a multipart 206."""
    if len(ranges) > 1:
        boundary = uuid.uuid4().hex
        response = web.StreamResponse(status=206, headers={
            **headers, "Content-Type": f"multipart/byteranges; boundary={boundary}"})
        parts = [(f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n").encode()
                 for start, end in ranges]
        closing = f"--{boundary}--\r\n".encode()
        response.content_length = len(closing) + sum(
            len(part) + (end - start) + 2 for part, (start, end) in zip(parts, ranges))
    else:
        start, end = ranges[0]
        response = web.StreamResponse(status=206 if partial else 200, headers=headers)
        if partial:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        if end is not None:
            response.content_length = end - start
    await response.prepare(request)
    try:
        if len(ranges) > 1:
            for part, (start, end) in zip(parts, ranges):
                await response.write(part)
                await send(response, start, end)
                await response.write(b"\r\n")
            await response.write(closing)
        else:
            await send(response, start, end)
    except FillFailed as e:
        # Headers are out: closing the connection is the only way left to say "broken".
        log.warning("ending %s short for %s: %s", headers.get("Docker-Content-Digest"),
                    request.remote, e)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


async def _sendfile(request: web.Request, file: BinaryIO, start: int, end: int) -> None:
    """Bytes [start, end) of a file to the client, by the kernel where it can.

    asyncio sends in socket-buffer-sized steps and returns to the loop between them; under
    TLS its fallback reads the file on a thread. Bytes written through aiohttp before (the
    headers, a part's header) leave first: sendfile waits for the transport's buffer.
    """
    if end <= start:
        return  # asyncio's sendfile takes a count of 0 to mean "to the end of the file"
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    try:
        await asyncio.get_running_loop().sendfile(transport, file, start, end - start)
    except RuntimeError:  # asyncio's "transport is closing", raised as the client leaves
        if transport.is_closing():
            raise ConnectionResetError("the client went away") from None
        raise


async def _send_fill(request: web.Request, response: web.StreamResponse, fill: Fill,
                     spool: BinaryIO, start: int, end: int | None) -> None:
    offset = start
    while (limit := await fill.readable(offset, end)) > offset:
        on_disk = min(limit, fill.on_disk)
        if offset < on_disk and end is not None:
            await _sendfile(request, spool, offset, on_disk)
            offset = on_disk
            continue
        # Chunked (the upstream sent no length, and sendfile would bypass the chunk framing)
        # or past the spool's end (disk full): through aiohttp's writer.
        if offset < on_disk:
            data = await asyncio.get_running_loop().run_in_executor(
                None, _pread, spool, min(READ_CHUNK, on_disk - offset), offset)
        else:
            data = fill.overflow(offset, limit - offset)
        await response.write(data)
        offset += len(data)


def _pread(file: BinaryIO, count: int, offset: int) -> bytes:
    return os.pread(file.fileno(), count, offset)
