"""Blob responses: a committed file by sendfile, multi-range as multipart/byteranges, and a
fill streamed to the client as it grows.

Ranges follow RFC 9110 section 14: Docker and containerd resume with `bytes=N-` and need
206 with `Content-Range: bytes N-E/SIZE`; podman's zstd:chunked sends several ranges and
must never get 416 for them (aiohttp's FileResponse would answer 416), so we answer those
with a real `multipart/byteranges` 206.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from ..cache.fill import Fill, FillFailed
from ..errors import RangeInvalid

log = logging.getLogger("mirror")

RANGE_SPEC = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")
MAX_RANGES = 64
READ_CHUNK = 1 << 20


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """[start, end) pairs for a Range header; None means "ignore it, send everything"."""
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not specs:
        return None  # RFC 9110: an unknown range unit is ignored
    ranges = []
    for spec in specs.split(","):
        m = RANGE_SPEC.fullmatch(spec)
        if not m or (not m.group(1) and not m.group(2)):
            return None  # a malformed Range is ignored as well
        first, last = m.group(1), m.group(2)
        if first:
            start = int(first)
            end = min(int(last) + 1, size) if last else size
            if last and int(last) < start:
                return None
        else:
            start, end = max(size - int(last), 0), size
        if start < end:
            ranges.append((start, end))
    if not ranges:
        raise RangeInvalid(f"no requested range lies within the blob's {size} bytes",
                           headers={"Content-Range": f"bytes */{size}"})
    return ranges[:MAX_RANGES]


async def file_response(request: web.Request, path: Path, size: int,
                        headers: dict[str, str]) -> web.StreamResponse:
    """A committed blob. One range or none: FileResponse and the kernel's sendfile."""
    range_header = request.headers.get("Range")
    if range_header and "," in range_header:
        ranges = parse_ranges(range_header, size)
        if ranges is not None and len(ranges) > 1:
            return await _multipart(request, path, size, ranges, headers)
    if range_header:
        parse_ranges(range_header, size)  # raises RangeInvalid as OCI JSON; FileResponse would not
    return web.FileResponse(path, headers=headers)


async def _multipart(request: web.Request, path: Path, size: int, ranges: list[tuple[int, int]],
                     headers: dict[str, str]) -> web.StreamResponse:
    boundary = uuid.uuid4().hex
    parts = [(f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
              f"Content-Range: bytes {start}-{end - 1}/{size}\r\n\r\n").encode()
             for start, end in ranges]
    closing = f"--{boundary}--\r\n".encode()
    length = sum(len(p) + (end - start) + 2 for p, (start, end) in zip(parts, ranges))
    response = web.StreamResponse(status=206, headers={
        **headers, "Content-Type": f"multipart/byteranges; boundary={boundary}",
        "Content-Length": str(length + len(closing))})
    await response.prepare(request)
    fd = os.open(path, os.O_RDONLY)
    try:
        for part, (start, end) in zip(parts, ranges):
            await response.write(part)
            while start < end:
                data = os.pread(fd, min(READ_CHUNK, end - start), start)
                if not data:
                    raise OSError(f"{path} is shorter than {end} bytes")
                start += len(data)
                await response.write(data)
            await response.write(b"\r\n")
        await response.write(closing)
    finally:
        os.close(fd)
    return response


async def fill_response(request: web.Request, fill: Fill, fd: int,
                        headers: dict[str, str]) -> web.StreamResponse:
    """A blob still arriving from upstream, sent from the spool as its bytes exist.

    Bytes go out by sendfile straight from the spool file, so memory does not grow with the
    blob or with the number of readers. If the fill fails after the headers went out, the
    connection is closed before Content-Length bytes were sent: the client sees a short
    body, never a whole one.
    """
    with os.fdopen(fd, "rb") as spool:
        await fill.started()
        status, start, end = 200, 0, fill.size
        range_header = request.headers.get("Range")
        if range_header and fill.size is not None:
            ranges = parse_ranges(range_header, fill.size)
            # Several ranges of a blob still arriving: the whole blob (200) is a valid answer.
            if ranges is not None and len(ranges) == 1:
                status, (start, end) = 206, ranges[0]
                headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{fill.size}"}
        response = web.StreamResponse(status=status, headers=headers)
        if end is not None:
            response.content_length = end - start
        await response.prepare(request)
        try:
            await _send_fill(request, response, fill, spool, start, end)
        except FillFailed as e:
            # Headers are out: closing the connection is the only way left to say "broken".
            log.warning("ending %s short for %s: %s", fill.digest, request.remote, e)
            if request.transport is not None:
                request.transport.close()
        return response


async def _send_fill(request: web.Request, response: web.StreamResponse, fill: Fill,
                     spool: BinaryIO, start: int, end: int | None) -> None:
    loop = asyncio.get_running_loop()
    offset = start
    while (limit := await fill.readable(offset, end)) > offset:
        on_disk = min(limit, fill.on_disk)
        if offset < on_disk and end is not None:
            if request.transport is None:
                raise ConnectionResetError("the client went away")
            await loop.sendfile(request.transport, spool, offset, on_disk - offset)
            offset = on_disk
            continue
        # Chunked (the upstream sent no length, and sendfile would bypass the chunk framing)
        # or past the spool's end (disk full): through aiohttp's writer.
        if offset < on_disk:
            data = os.pread(spool.fileno(), min(READ_CHUNK, on_disk - offset), offset)
        else:
            data = fill.overflow(offset, limit - offset)
        await response.write(data)
        offset += len(data)
    await response.write_eof()
