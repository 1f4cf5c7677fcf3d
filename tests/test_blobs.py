"""Blobs: Range and multi-range, HEAD, one shared verified fill, and nothing bad ever stored."""

import asyncio
import subprocess

import aiohttp
import pytest

from tests.conftest import fetched

MiB = 1 << 20


async def pulled_manifest(mirror, http):
    """A pull starts with the manifest: it puts the repository in the cache, so the mirror
    asks the upstream about the repository's blobs (a name with nothing cached answers
    blob HEADs locally, for pushes)."""
    async with http.get(f"{mirror.url}/v2/library/alpine/manifests/latest") as resp:
        assert resp.status == 200


async def authorized(mirror, http, digest):
    """Let the mirror meet the upstream's auth challenge first (as a HEAD), so a one-shot
    fault set on GET hits the blob's body, not the 401 that precedes the first token."""
    await pulled_manifest(mirror, http)
    async with http.head(blob_url(mirror, digest)) as resp:
        assert resp.status == 200


def blob_url(mirror, digest, name="library/alpine"):
    return f"{mirror.url}/v2/{name}/blobs/{digest}"


async def committed(mirror, digest):
    """Wait until the fill of `digest` finished (its last bytes go out just before commit)."""
    while digest in mirror.proxy.fills.active:
        await asyncio.sleep(0.01)


async def get(http, url, **headers):
    async with http.get(url, headers=headers) as resp:
        return resp.status, resp.headers, await resp.read()


@pytest.mark.parametrize("warm", [False, True], ids=["in-flight", "committed"])
async def test_range_resume_answers_206_with_content_range(mirror, http, big, warm):
    digest, data = big
    if warm:
        assert (await get(http, blob_url(mirror, digest)))[2] == data
    status, headers, body = await get(http, blob_url(mirror, digest), Range="bytes=1000-")
    assert status == 206
    assert headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert body == data[1000:]
    status, headers, body = await get(http, blob_url(mirror, digest), Range="bytes=10-19")
    assert (status, body) == (206, data[10:20])


async def test_range_past_the_end_is_416_with_size(mirror, http, big):
    digest, data = big
    status, headers, body = await get(http, blob_url(mirror, digest),
                                      Range=f"bytes={len(data)}-")
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(data)}"


async def multipart_parts(resp) -> list[tuple[str, bytes]]:
    assert resp.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
    reader = aiohttp.MultipartReader.from_response(resp)
    parts = []
    while (part := await reader.next()) is not None:
        parts.append((part.headers["Content-Range"], await part.read()))
    return parts


@pytest.mark.parametrize("warm", [False, True], ids=["in-flight", "committed"])
async def test_multi_range_gets_multipart_byteranges_never_416(mirror, http, big, warm):
    """podman's zstd:chunked partial pulls ask for several ranges at once. On a blob still
    arriving the parts wait for the digest to check out, then come as from a cached one."""
    digest, data = big
    if warm:
        await get(http, blob_url(mirror, digest))
        await committed(mirror, digest)
    async with http.get(blob_url(mirror, digest), headers={"Range": "bytes=0-9,100-199,-5"}) as r:
        assert r.status == 206
        parts = await multipart_parts(r)
    size = len(data)
    assert parts == [(f"bytes 0-9/{size}", data[0:10]), (f"bytes 100-199/{size}", data[100:200]),
                     (f"bytes {size - 5}-{size - 1}/{size}", data[-5:])]


async def test_head_has_content_length_and_never_fetches_a_body(mirror, http, upstream, big):
    digest, data = big
    await pulled_manifest(mirror, http)
    async with http.head(blob_url(mirror, digest)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        assert resp.headers["Docker-Content-Digest"] == digest
    assert fetched(upstream, "GET", digest) == 0
    assert fetched(upstream, "HEAD", digest) == 1
    assert upstream.proxy.body_bytes(digest) == 0
    assert mirror.blob_files() == []
    await get(http, blob_url(mirror, digest))
    await committed(mirror, digest)
    async with http.head(blob_url(mirror, digest)) as resp:  # committed: local answer
        assert resp.headers["Content-Length"] == str(len(data))
    assert fetched(upstream, "HEAD", digest) == 1
    assert [p.read_bytes() for p in mirror.blob_files()] == [data]


async def test_concurrent_clients_share_one_upstream_fetch(mirror, http, upstream, big):
    digest, data = big
    upstream.proxy.throttle(4 * MiB, match=digest)
    bodies = await asyncio.gather(*(get(http, blob_url(mirror, digest)) for _ in range(8)))
    assert all(status == 200 and body == data for status, _, body in bodies)
    assert fetched(upstream, "GET", digest) == 1
    assert sum(r.sent for r in upstream.proxy.records if r.status == 200) == len(data)


async def test_late_joiner_streams_from_the_spool_before_the_fill_ends(mirror, http, upstream,
                                                                       big):
    digest, data = big
    upstream.proxy.throttle(2 * MiB, match=digest)
    first = asyncio.ensure_future(get(http, blob_url(mirror, digest)))
    while (fill := mirror.proxy.fills.active.get(digest)) is None or fill.written < MiB:
        await asyncio.sleep(0.02)
    async with http.get(blob_url(mirror, digest)) as resp:
        head = await resp.content.readexactly(512 * 1024)
        # The joiner had half a MiB while the upstream was still sending.
        assert digest in mirror.proxy.fills.active
        rest = await resp.read()
    assert head + rest == data
    assert (await first)[2] == data
    assert fetched(upstream, "GET", digest) == 1


async def test_client_leaving_does_not_stop_the_fill(mirror, http, upstream, big):
    digest, data = big
    upstream.proxy.throttle(4 * MiB, match=digest)
    async with http.get(blob_url(mirror, digest)) as resp:
        await resp.content.readexactly(64 * 1024)
        resp.close()  # the client hangs up early
    await committed(mirror, digest)
    assert [p.read_bytes() for p in mirror.blob_files()] == [data]
    status, _, body = await get(http, blob_url(mirror, digest))
    assert body == data and fetched(upstream, "GET", digest) == 1


async def read_short(http, url) -> tuple[int, int]:
    """(bytes received, Content-Length promised) of a response that must end short."""
    received = 0
    async with http.get(url) as resp:
        promised = int(resp.headers["Content-Length"])
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += len(chunk)
    return received, promised


async def test_corrupt_upstream_bytes_are_never_stored_or_delivered_whole(mirror, http, upstream,
                                                                         big):
    digest, data = big
    await authorized(mirror, http, digest)
    upstream.proxy.corrupt(offset=len(data) // 2, match=digest, times=1)
    received, promised = await read_short(http, blob_url(mirror, digest))
    assert received < promised == len(data)
    assert mirror.blob_files() == [] and list((mirror.root / "tmp").iterdir()) == []
    # The next request fetches again, and gets the real bytes.
    status, _, body = await get(http, blob_url(mirror, digest))
    assert (status, body) == (200, data)
    assert fetched(upstream, "GET", digest) == 2


async def test_upstream_cut_mid_body_ends_every_reader_short_then_resumes(mirror, http,
                                                                         upstream, big):
    digest, data = big
    await authorized(mirror, http, digest)
    upstream.proxy.cut(at=MiB, match=digest, times=1)
    results = await asyncio.gather(*(read_short(http, blob_url(mirror, digest)) for _ in range(3)))
    assert all(received <= MiB < promised for received, promised in results)
    assert mirror.blob_files() == []
    # The bytes that did arrive are kept, so the next request asks only for the rest.
    status, _, body = await get(http, blob_url(mirror, digest))
    assert (status, body) == (200, data)
    gets = [r for r in upstream.proxy.records if r.method == "GET" and digest in r.path]
    assert [r.status for r in gets] == [200, 206]
    # Resumed where the kept bytes end: at most the 1 MiB sent before the cut (less what
    # the cut connection lost in its buffers).
    assert len(data) - MiB <= gets[1].sent < len(data)
    await committed(mirror, digest)
    assert [p.read_bytes() for p in mirror.blob_files()] == [data]
    assert list((mirror.root / "tmp").iterdir()) == []


async def test_stalled_upstream_is_aborted_by_the_progress_watchdog(start_mirror, http, upstream,
                                                                    big):
    mirror = await start_mirror(limits={"stall_timeout": 1.0})
    digest, data = big
    await authorized(mirror, http, digest)
    upstream.proxy.stall(after=MiB, match=digest, times=1)
    received, promised = await read_short(http, blob_url(mirror, digest))
    assert received < promised
    assert mirror.blob_files() == []
    upstream.proxy.release()
    assert (await get(http, blob_url(mirror, digest)))[2] == data


async def test_unknown_blob_is_blob_unknown(mirror, http, upstream):
    status, _, body = await get(http, blob_url(mirror, "sha256:" + "0" * 64))
    assert status == 404 and b'"BLOB_UNKNOWN"' in body


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem, too small for the 3 MiB layer. Mounting it needs root, as
    the README's test command has in CI (and as the containerd tests need too)."""
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test needs root to mount a tmpfs: {mounted.stderr}"
    yield root
    subprocess.run(["umount", "-l", str(root)], check=True)


async def test_disk_full_while_filling_still_serves_clients_and_stores_nothing(
        start_mirror, http, upstream, big, small_disk, caplog):
    mirror = await start_mirror(root=small_disk)
    digest, data = big
    bodies = await asyncio.gather(*(get(http, blob_url(mirror, digest)) for _ in range(3)))
    assert all(status == 200 and body == data for status, _, body in bodies)
    await committed(mirror, digest)
    assert mirror.blob_files() == [] and list((small_disk / "tmp").iterdir()) == []
    assert "keeping the rest in memory" in caplog.text
    assert fetched(upstream, "GET", digest) == 1


async def test_blobs_are_never_compressed_on_the_way_out(mirror, http, big):
    """containerd sends Accept-Encoding: zstd, gzip, deflate and would decode the body."""
    digest, data = big
    for _ in range(2):  # in flight, then committed
        async with http.get(blob_url(mirror, digest),
                            headers={"Accept-Encoding": "zstd, gzip, deflate"}) as resp:
            assert "Content-Encoding" not in resp.headers
            assert await resp.read() == data
        await committed(mirror, digest)
