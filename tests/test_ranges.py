"""Range requests by RFC 9110: the same answer on a cached blob and on one still filling,
bounded work for hostile range sets, multi-range bodies that let other requests through,
and ranges of a filling blob served only from bytes whose digest checked out (issue 9)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from mirror.api.responses import parse_ranges
from mirror.app import make_app
from mirror.errors import RangeInvalid
from mirror.keys import PROXY
from tests.conftest import fetched, mirror_config
from tests.support.serverthread import ServerThread
from tests.test_blobs import authorized, blob_url, committed

MiB = 1 << 20
HUGE = "9" * 5000  # past Python's 4300-digit int() limit: a ValueError if ever int()-ed


# -- parse_ranges, the function ----------------------------------------------------------

@pytest.mark.parametrize("header", [
    "items=0-5", "bytes 0-5", "bytes=", "bytes=,", "bytes=5-1", "bytes=-", "bytes=a-b",
    "bytes=0-5;x", "bytes=0-1,5-1", "bytes=--5", "bytes=1-2-3", "bytes=\u0661-\u0665",
    f"bytes={HUGE}-1",
])
def test_malformed_range_is_ignored(header):
    assert parse_ranges(header, 1000) is None


@pytest.mark.parametrize("header, expected", [
    ("bytes=0-9", [(0, 10)]),
    ("BYTES=0-9", [(0, 10)]),  # range units are case-insensitive
    ("bytes=990-", [(990, 1000)]),
    ("bytes=-10", [(990, 1000)]),
    ("bytes=-5000", [(0, 1000)]),
    ("bytes=900-5000", [(900, 1000)]),
    (f"bytes=0-{HUGE}", [(0, 1000)]),
    ("bytes= 0-9 , ,20-29", [(0, 10), (20, 30)]),  # OWS and empty list elements
    ("bytes=0-9,10-19", [(0, 10), (10, 20)]),  # ascending, disjoint: as asked, part by part
    ("bytes=0-9,2000-,20-29", [(0, 10), (20, 30)]),  # an unsatisfiable one is left out
    ("bytes=20-29,0-9", [(0, 10), (20, 30)]),  # out of order: sorted
    ("bytes=0-50,40-99,100-109,500-", [(0, 110), (500, 1000)]),  # overlapping: merged
    ("bytes=" + ",".join(["0-"] * 16), [(0, 1000)]),
])
def test_range_sets_are_parsed_and_coalesced(header, expected):
    assert parse_ranges(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-6000", "bytes=-0",
                                    f"bytes={HUGE}-", "bytes=1000-1001,2000-"])
def test_unsatisfiable_range_is_range_invalid_with_the_size(header):
    with pytest.raises(RangeInvalid) as raised:
        parse_ranges(header, 1000)
    assert raised.value.headers == {"Content-Range": "bytes */1000"}


def test_more_ranges_than_the_limit_are_ignored():
    header = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(17))
    assert parse_ranges(header, 1000, max_ranges=16) is None
    assert len(parse_ranges(header, 1000, max_ranges=17)) == 17


def test_an_empty_blob_ignores_ranges():
    assert parse_ranges("bytes=0-", 0) is None


# -- over HTTP, on a committed blob and on one still arriving ----------------------------

async def answer(http, url, range_header):
    async with http.get(url, headers={"Range": range_header}) as resp:
        return resp.status, resp.headers, await resp.read()


async def answers(mirror, http, upstream, digest, warm, *range_headers):
    """The answers to each Range, all on the committed blob or all on one fill."""
    if warm:
        async with http.get(blob_url(mirror, digest)) as resp:
            await resp.read()
        await committed(mirror, digest)
    else:
        # Slow enough that every request joins the one fill.
        upstream.proxy.throttle(4 * MiB, match=digest, times=1)
    results = await asyncio.gather(*(answer(http, blob_url(mirror, digest), h)
                                     for h in range_headers))
    assert fetched(upstream, "GET", digest) == 1
    return results


WARM = pytest.mark.parametrize("warm", [False, True], ids=["in-flight", "committed"])


@WARM
async def test_malformed_range_gets_the_whole_blob_on_cached_and_filling(mirror, http,
                                                                         upstream, big, warm):
    digest, data = big
    bad = ["bytes=5-1", "items=0-5", "garbage", "bytes=0-1,x", f"bytes={HUGE}-3"]
    for status, headers, body in await answers(mirror, http, upstream, digest, warm, *bad):
        assert (status, body) == (200, data)
        assert "Content-Range" not in headers
        assert headers["Accept-Ranges"] == "bytes"


@WARM
async def test_huge_range_numbers_are_answered_never_a_500(mirror, http, upstream, big, warm):
    digest, data = big
    (s1, h1, b1), (s2, h2, b2) = await answers(mirror, http, upstream, digest, warm,
                                               f"bytes=0-{HUGE}", f"bytes={HUGE}-")
    assert (s1, b1) == (206, data)
    assert h1["Content-Range"] == f"bytes 0-{len(data) - 1}/{len(data)}"
    assert s2 == 416 and h2["Content-Range"] == f"bytes */{len(data)}"
    assert json.loads(b2)["errors"][0]["code"] == "RANGE_INVALID"


@WARM
async def test_unsatisfiable_range_is_416_with_oci_json(mirror, http, upstream, big, warm):
    digest, data = big
    for status, headers, body in await answers(mirror, http, upstream, digest, warm,
                                               f"bytes={len(data)}-", "bytes=-0"):
        assert status == 416
        assert headers["Content-Range"] == f"bytes */{len(data)}"
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body)["errors"][0]["code"] == "RANGE_INVALID"


@WARM
async def test_overlapping_ranges_are_merged_so_the_answer_is_never_bigger_than_the_blob(
        mirror, http, upstream, big, warm):
    digest, data = big
    size = len(data)
    sixteen = "bytes=" + ",".join(["0-"] * 16)  # the limit's worth of the whole blob
    sixty_four = "bytes=" + ",".join(["0-"] * 64)  # the 197-byte header
    reversed_ = "bytes=2000-2999,0-999,500-1499"
    (s16, h16, b16), (s64, _, b64), (sr, hr, br) = await answers(
        mirror, http, upstream, digest, warm, sixteen, sixty_four, reversed_)
    assert (s16, h16["Content-Range"], b16) == (206, f"bytes 0-{size - 1}/{size}", data)
    assert (s64, b64) == (200, data)  # more ranges than limits.max_ranges: the whole blob
    assert sr == 206
    parts = split_multipart(hr["Content-Type"], br)
    assert parts == [(f"bytes 0-1499/{size}", data[:1500]),
                     (f"bytes 2000-2999/{size}", data[2000:3000])]


def split_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges body, checked whole."""
    media_type, _, boundary = content_type.partition("; boundary=")
    assert media_type == "multipart/byteranges" and boundary
    delimiter = b"--" + boundary.encode()
    assert body.endswith(delimiter + b"--\r\n")
    parts = []
    for chunk in body[:-len(delimiter) - 4].split(delimiter)[1:]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        assert data.endswith(b"\r\n")
        parts.append((headers["Content-Range"], data[:-2]))
    return parts


# -- multi-range bodies leave the event loop free -----------------------------------------

@pytest.fixture
def threaded_mirror(tmp_path, upstream):
    """A mirror on its own thread and event loop, so a handler that blocked its loop would
    show as other requests waiting — the test's clients run on the test's loop."""
    thread = ServerThread("mirror").start()
    app = make_app(mirror_config(tmp_path / "data", upstream.url))
    port = thread.serve(app)
    yield f"http://127.0.0.1:{port}", thread, app
    thread.stop()


@pytest.fixture(scope="module")
def large_layer(upstream):
    image = upstream.push_image("ranges/large", "v1", "large-layer", size=16 * MiB)
    digest = max(image.layer_digests, key=lambda d: len(image.blobs[d]))
    return digest, image.blobs[digest]


async def test_multi_range_clients_do_not_stop_a_ping_from_being_answered(threaded_mirror,
                                                                          large_layer):
    url, thread, app = threaded_mirror
    digest, data = large_layer
    blob = f"{url}/v2/ranges/large/blobs/{digest}"
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(blob) as resp:
            assert await resp.read() == data

        async def filled() -> None:
            while digest in app[PROXY].fills.active:
                await asyncio.sleep(0.01)

        thread.call(filled())
        step = len(data) // 16
        ranges = [(i * step, len(data) if i == 15 else (i + 1) * step) for i in range(16)]
        header = "bytes=" + ",".join(f"{a}-{b - 1}" for a, b in ranges)
        finished: list[str] = []
        started = [asyncio.Event() for _ in range(4)]

        async def range_client(n: int) -> list[tuple[str, bytes]]:
            async with http.get(blob, headers={"Range": header}) as resp:
                assert resp.status == 206
                body = b""
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    started[n].set()
                    await asyncio.sleep(0.005)  # a client reading at its own pace
                finished.append(f"range {n}")
                return split_multipart(resp.headers["Content-Type"], body)

        clients = [asyncio.ensure_future(range_client(n)) for n in range(4)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
        async with http.get(f"{url}/v2/") as resp:  # while all four are mid-body
            assert (resp.status, await resp.read()) == (200, b"{}")
            finished.append("ping")
        results = await asyncio.wait_for(asyncio.gather(*clients), 120)
    size = len(data)
    expected = [(f"bytes {a}-{b - 1}/{size}", data[a:b]) for a, b in ranges]
    assert all(parts == expected for parts in results)
    assert finished[0] == "ping"


# -- ranges of a filling blob come only from verified bytes (issue 9) ----------------------

async def filling(mirror, digest, written: int):
    """The fill of `digest` once it has stored `written` bytes (a chunk counts once the next
    one arrived, so a fill stalled at N bytes shows a little less than N)."""
    async def wait():
        while (fill := mirror.proxy.fills.active.get(digest)) is None or fill.written < written:
            await asyncio.sleep(0.01)
        return fill

    return await asyncio.wait_for(wait(), 30)


async def outcome(http, url, range_header: str | None):
    """("error", status) | ("short", received, promised) | ("complete", status, body)."""
    headers = {"Range": range_header} if range_header else {}
    async with http.get(url, headers=headers) as resp:
        if resp.status >= 500:
            body = await resp.read()
            assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
            return ("error", resp.status)
        promised, received = int(resp.headers["Content-Length"]), b""
        try:
            async for chunk in resp.content.iter_any():
                received += chunk
        except aiohttp.ClientPayloadError:
            return ("short", len(received), promised)
        return ("complete", resp.status, received)


async def test_no_client_gets_a_complete_response_with_a_flipped_byte(mirror, http, upstream,
                                                                      big):
    digest, data = big
    size, flip = len(data), len(data) // 2
    await authorized(mirror, http, digest)
    upstream.proxy.corrupt(offset=flip, match=digest, times=1)
    upstream.proxy.throttle(2 * MiB, match=digest, times=1)  # every request joins the fill
    url = blob_url(mirror, digest)
    asked = {
        "whole body": None,
        "before the flip": "bytes=0-999",
        "containing it": f"bytes={flip - 10}-{flip + 10}",
        "after it": f"bytes={flip + 1000}-{flip + 1999}",
        "from before it to the end": "bytes=1000-",
        "after it to the end": f"bytes={flip + 1000}-",
        "the last bytes": "bytes=-100",
        "several": f"bytes=0-9,{flip}-{flip},{size - 10}-",
    }
    first = asyncio.ensure_future(outcome(http, url, None))  # starts the fill
    await filling(mirror, digest, 1)
    results = dict(zip(asked, await asyncio.gather(*(outcome(http, url, r)
                                                     for r in asked.values()))))
    results["the first client"] = await first
    for what, result in results.items():
        assert result[0] in ("short", "error"), f"{what}: {result}"
        if result[0] == "short":
            assert result[1] < result[2], what
    # Nothing was stored; the next request fetches again and gets the real bytes.
    assert mirror.blob_files() == []
    assert await outcome(http, url, f"bytes={flip - 10}-{flip + 10}") == (
        "complete", 206, data[flip - 10:flip + 11])
    assert fetched(upstream, "GET", digest) == 2


async def test_range_ending_before_the_end_is_sent_once_the_fill_is_verified(mirror, http,
                                                                             upstream, big):
    digest, data = big
    await authorized(mirror, http, digest)
    upstream.proxy.stall(after=2 * MiB, match=digest, times=1)
    url = blob_url(mirror, digest)
    whole = asyncio.ensure_future(outcome(http, url, None))
    fill = await filling(mirror, digest, MiB)

    async def ranged():
        async with http.get(url, headers={"Range": "bytes=0-9"}) as resp:
            verified_when_answered = fill.verified
            return resp.status, await resp.read(), verified_when_answered

    request = asyncio.ensure_future(ranged())
    # Bytes 0-9 have been on disk all along; give an answer from them the chance to come.
    await asyncio.wait({request}, timeout=1.0)
    upstream.proxy.release()
    assert await request == (206, data[:10], True)
    assert await whole == ("complete", 200, data)
    assert fetched(upstream, "GET", digest) == 1


async def test_resume_to_the_end_streams_before_the_fill_ends(mirror, http, upstream, big):
    """`bytes=N-` (Docker's and containerd's resume) ends at the blob's end: it streams as
    the spool grows, only its last byte waits for the digest."""
    digest, data = big
    await authorized(mirror, http, digest)
    upstream.proxy.stall(after=2 * MiB, match=digest, times=1)
    url = blob_url(mirror, digest)
    whole = asyncio.ensure_future(outcome(http, url, None))
    fill = await filling(mirror, digest, MiB)
    async with http.get(url, headers={"Range": "bytes=1000-"}) as resp:
        assert resp.status == 206
        head = await resp.content.readexactly(512 * 1024)  # while the upstream is stalled
        assert not fill.verified
        upstream.proxy.release()
        rest = await resp.read()
    assert head + rest == data[1000:]
    assert await whole == ("complete", 200, data)

