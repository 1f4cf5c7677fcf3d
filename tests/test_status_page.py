"""The status page at `/`: what it says after traffic, and how it renders in a real browser
(headless Chromium, Debian's `chromium`, through tests/support/chromium.py; scripts/test.sh
installs it). Its trends, denials and JSON twin: test_status_trends.py and
test_status_browser.py."""

import asyncio
import struct
import zlib

from mirror.api import status
from mirror.metrics import METRICS
from tests.support import chromium

WIDTH, HEIGHT = 1200, 900


async def read(http, url, **headers):
    async with http.get(url, headers=headers) as resp:
        return resp.status, await resp.read()


async def page(http, mirror) -> str:
    async with http.get(f"{mirror.url}/") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        return await resp.text()


async def stalled_fill(mirror, digest: str) -> int:
    """Wait until the fill of `digest` has written bytes and stopped growing; its count."""
    written, steady = -1, 0
    for _ in range(1000):
        fill = mirror.proxy.fills.active.get(digest)
        if fill is not None and fill.written > 0:
            steady = steady + 1 if fill.written == written else 0
            written = fill.written
            if steady == 10:
                return written
        await asyncio.sleep(0.02)
    raise AssertionError(f"the fill of {digest} did not stall with bytes written")


def decode_png(data: bytes) -> tuple[int, int, list[bytes], int]:
    """(width, height, rows of pixels, bytes per pixel) of an 8-bit RGB(A) PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, bytearray(), None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(bytes(idat)), width * bpp
    rows, previous = [], bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, previous))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = previous[i], previous[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, rows, bpp


async def test_status_page_shows_traffic_upstreams_and_a_running_fill(
        mirror, http, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    big = max(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    small = min(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    # Traffic: a cold and three warm pulls of a manifest and a blob, and a 429 from quay.io.
    for _ in range(4):
        assert (await read(http, f"{mirror.url}/v2/alpine/manifests/3.19", **accept))[0] == 200
        assert (await read(http, f"{mirror.url}/v2/alpine/blobs/{small}"))[0] == 200
        while small in mirror.proxy.fills.active:
            await asyncio.sleep(0.01)
    upstream.proxy.status(429, {"Retry-After": "60"}, match="/manifests/", times=1)
    assert (await read(http, f"{mirror.url}/v2/quay.io/team/app/manifests/2.0"))[0] == 429

    # A fill held partway: the upstream stalls after 2 MiB of the 3 MiB layer.
    async with http.head(f"{mirror.url}/v2/alpine/blobs/{big}") as resp:
        assert resp.status == 200  # the token challenge is met before the stall is set
    upstream.proxy.stall(after=2 << 20, match=big, method="GET")
    reader = asyncio.ensure_future(read(http, f"{mirror.url}/v2/alpine/blobs/{big}"))
    try:
        written = await stalled_fill(mirror, big)

        html = await page(http, mirror)
        assert "docker.io" in html and "quay.io" in html
        # 3 warm of 4 manifest and of 4 blob GETs; the 429 and the stalled layer missed.
        assert status.hit_ratio(mirror.server.app[METRICS]) == 6 / 10
        assert "<dt>hit ratio</dt><dd>60.0%</dd>" in html
        assert "rate limited" in html and "429 Too Many Requests" in html
        assert big[:19] in html  # sha256: and the first 12 hex digits
        assert f"{status._bytes(written)} / 3.0 MiB" in html
        assert "docker.io/library/alpine" in html  # the busiest repository
        assert "<script" not in html
        assert '<section class="card" id="trends"><h2>Trends, last hour</h2>' in html
        assert '<section class="card" id="denials"><h2>Denials and failures</h2>' in html
        assert '<td class="n">429</td><td>quay.io</td><td><code>team/app</code></td>' \
            "<td><code>2.0</code></td><td>upstream quay.io is rate limiting this mirror</td>" \
            in html

        shot = tmp_path / "status.png"
        await chromium.screenshot(f"{mirror.url}/", shot, tmp_path, size=(WIDTH, HEIGHT))
    finally:
        upstream.proxy.release()
    status_code, body = await reader
    assert (status_code, body) == (200, alpine.blobs[big])

    width, height, rows, bpp = decode_png(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    pixels = [row[i:i + 3] for row in rows[::3] for i in range(0, len(row), bpp * 3)]
    colours = {}
    for pixel in pixels:
        colours[pixel] = colours.get(pixel, 0) + 1
    background, most = max(colours.items(), key=lambda kv: kv[1])
    assert len(colours) >= 20, f"only {len(colours)} colours: a blank page?"
    assert most / len(pixels) < 0.9, "nearly all one colour: a blank page?"
    # The header band (dark blue) spans the top of the page.
    left, right = rows[5][:3], rows[5][(WIDTH - 40) * bpp:(WIDTH - 40) * bpp + 3]
    assert left == right and sum(left) < 300 < sum(background)


async def test_status_page_escapes_what_it_shows(mirror, http, upstream):
    mirror.proxy.upstreams["quay.io"].last_error = "<b>evil</b> & co"
    html = await page(http, mirror)
    assert "<b>evil</b>" not in html and "&lt;b&gt;evil&lt;/b&gt; &amp; co" in html


async def test_registry_routes_are_unchanged_beside_the_page(mirror, http, upstream):
    async with http.get(f"{mirror.url}/v2/") as resp:
        assert resp.status == 200 and await resp.json() == {}
    async with http.get(f"{mirror.url}/hub/v2/") as resp:
        assert resp.status == 200
    async with http.get(f"{mirror.url}/metrics/v2/") as resp:
        assert resp.status == 404  # "metrics" is taken as a prefix naming no upstream
