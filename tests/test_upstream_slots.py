"""Upstream slots that cannot starve: a request slot covers connecting and the response
headers only, blob bodies are bounded by their own permits, waiting has a deadline (503 with
Retry-After), and a 429 pause holds nothing. (Latency is measured in bench/starvation.py.)"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import fetched
from tests.support import images as imagelib

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
KiB = 1 << 10


@pytest.fixture(scope="module")
def sixteen_layers(upstream):
    """An image with 16 incompressible 512 KiB layers, pushed once for this module."""
    image = imagelib.build_image("slow/sixteen", ["v1"], [
        {"data.bin": imagelib.random_bytes(512 * KiB, f"sixteen/{i}")} for i in range(16)])
    return imagelib.push(upstream.registry, upstream.tokens, image)


async def until(condition, what: str, tries: int = 1500) -> None:
    """Wait for something the test started to happen (not a timing assertion)."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def read(http, url, method="GET"):
    async with http.request(method, url, headers=ACCEPT) as resp:
        return resp.status, resp.headers, await resp.read()


def streaming(upstream, image) -> int:
    """Blob bodies of `image` the upstream has started sending (status out, bytes moving)."""
    return sum(1 for r in upstream.proxy.records if r.status == 200 and r.method == "GET"
               and "/blobs/" in r.path and any(d in r.path for d in image.layer_digests))


async def test_manifests_answer_while_sixteen_slow_layers_stream(mirror, http, upstream,
                                                                 sixteen_layers):
    image, app = sixteen_layers, upstream.images["team/app"]
    # 16 KiB/s: each 512 KiB layer takes about half a minute, far longer than this test.
    upstream.proxy.throttle(16 * KiB, match="/v2/slow/sixteen/blobs/")
    pulls = [asyncio.ensure_future(read(http, f"{mirror.url}/v2/slow/sixteen/blobs/{d}"))
             for d in image.layer_digests]
    try:
        # All 16 bodies under way: as many as the upstream's default request slots.
        await until(lambda: streaming(upstream, image) == 16, "16 layer bodies streaming")
        fills = [mirror.proxy.fills.active[d] for d in image.layer_digests]

        status, headers, _ = await read(http, f"{mirror.url}/v2/team/app/manifests/2.0", "HEAD")
        assert status == 200 and headers["Docker-Content-Digest"] == app.digest
        status, headers, body = await read(http, f"{mirror.url}/v2/quay/team/app/manifests/2.0")
        assert (status, body) == (200, app.manifest)
        assert fetched(upstream, "HEAD", "/v2/team/app/manifests/2.0") == 1
        assert fetched(upstream, "GET", "/v2/team/app/manifests/2.0") == 1

        # ...and all of that while every one of the 16 layers was still streaming.
        assert not any(f.done for f in fills)
        assert all(mirror.proxy.fills.active.get(f.digest) is f for f in fills)
        assert not any(p.done() for p in pulls)
    finally:
        for p in pulls:
            p.cancel()
        await asyncio.gather(*pulls, return_exceptions=True)


async def test_blob_bodies_are_bounded_by_their_own_permits(start_mirror, http, upstream):
    mirror = await start_mirror(limits={"upstream_bodies": 2})
    images = [upstream.push_image(f"test/bodies{i}", "v", seed=f"bodies{i}") for i in range(4)]
    upstream.proxy.stall(after=0, match="/v2/test/bodies", method="GET")  # headers, no body
    pulls = [asyncio.ensure_future(read(http, f"{mirror.url}/v2/{i.name}/blobs/"
                                              f"{i.layer_digests[0]}")) for i in images]
    try:
        await until(lambda: upstream.proxy.stalled == 2, "two bodies under way")
        await asyncio.sleep(0.3)  # room for a third, if anything would let it through
        assert upstream.proxy.stalled == 2
        # Bodies do not hold request slots: a manifest goes up and comes back meanwhile.
        status, _, body = await read(http, f"{mirror.url}/v2/team/app/manifests/2.0")
        assert (status, body) == (200, upstream.images["team/app"].manifest)
        assert upstream.proxy.stalled == 2
        upstream.proxy.release()
        results = await asyncio.gather(*pulls)
    finally:
        upstream.proxy.release()
    assert [body for _, _, body in results] == [i.blobs[i.layer_digests[0]] for i in images]
    for image in images:
        assert fetched(upstream, "GET", image.layer_digests[0]) == 1


async def test_waiting_past_slot_timeout_answers_503_with_retry_after(start_mirror, http,
                                                                      upstream):
    mirror = await start_mirror(limits={"upstream_requests_per_upstream": 1,
                                        "slot_timeout": 0.5})
    upstream.proxy.hold(match="/v2/team/app/manifests/2.0")  # an upstream slow to answer
    first = asyncio.ensure_future(read(http, f"{mirror.url}/v2/team/app/manifests/2.0"))
    try:
        await until(lambda: upstream.proxy.stalled == 1, "the first request holding the slot")
        status, headers, body = await read(http, f"{mirror.url}/v2/alpine/manifests/3.19")
        assert status == 503 and int(headers["Retry-After"]) >= 1
        err = json.loads(body)["errors"][0]
        assert err["code"] == "UNAVAILABLE" and "limits.slot_timeout" in err["message"]
        assert upstream.proxy.count(contains="alpine") == 0  # it waited; it never went up
        # Another upstream's slots are its own.
        status, _, body = await read(http, f"{mirror.url}/v2/quay/library/alpine/manifests/3.19")
        assert (status, body) == (200, upstream.images["library/alpine"].manifest)
        upstream.proxy.release()
        status, _, body = await first
        assert (status, body) == (200, upstream.images["team/app"].manifest)
    finally:
        upstream.proxy.release()
        first.cancel()


async def test_waiting_past_slot_timeout_for_a_body_permit_answers_503(start_mirror, http,
                                                                       upstream):
    mirror = await start_mirror(limits={"upstream_bodies": 1, "slot_timeout": 0.5})
    alpine, app = upstream.images["library/alpine"], upstream.images["team/app"]
    upstream.proxy.stall(after=0, match="/v2/library/alpine/blobs/", method="GET")
    first = asyncio.ensure_future(read(
        http, f"{mirror.url}/v2/alpine/blobs/{alpine.layer_digests[0]}"))
    try:
        await until(lambda: upstream.proxy.stalled == 1, "one body holding the only permit")
        digest = app.layer_digests[0]
        status, headers, body = await read(http, f"{mirror.url}/v2/team/app/blobs/{digest}")
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert "limits.upstream_bodies" in json.loads(body)["errors"][0]["message"]
        assert upstream.proxy.count(contains=digest) == 0
        upstream.proxy.release()
        status, _, body = await first
        assert body == alpine.blobs[alpine.layer_digests[0]]
    finally:
        upstream.proxy.release()
        first.cancel()


async def test_a_429_pause_does_not_block_another_upstream(start_mirror, http, upstream):
    # One global slot: an upstream sleeping on it would stop every other upstream.
    mirror = await start_mirror(limits={"upstream_requests": 1, "slot_timeout": 30})
    alpine, app = upstream.images["library/alpine"], upstream.images["team/app"]
    upstream.proxy.status(429, headers={"Retry-After": "3"},
                          match="/v2/library/alpine/manifests/3.19", times=1)
    status, headers, _ = await read(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    assert status == 429 and headers["Retry-After"] == "3"

    paused = asyncio.ensure_future(read(http, f"{mirror.url}/v2/alpine/manifests/3.19"))
    await asyncio.sleep(0.3)  # let it reach its pause
    assert not paused.done()
    status, _, body = await read(http, f"{mirror.url}/v2/quay/team/app/manifests/2.0")
    assert (status, body) == (200, app.manifest)
    assert not paused.done()  # quay.io answered while docker.io was still sitting it out
    status, _, body = await paused
    assert (status, body) == (200, alpine.manifest)
    assert fetched(upstream, "GET", "/v2/library/alpine/manifests/3.19") == 2  # 429, 200


async def test_a_429_pause_longer_than_slot_timeout_is_answered_at_once(start_mirror, http,
                                                                        upstream):
    mirror = await start_mirror(limits={"slot_timeout": 5})
    upstream.proxy.status(429, headers={"Retry-After": "120"},
                          match="/v2/library/alpine/manifests/", times=1)
    status, headers, _ = await read(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    assert status == 429 and headers["Retry-After"] == "120"
    # The next one is not sent (the upstream asked for quiet) and does not hang for 120 s.
    status, headers, body = await asyncio.wait_for(
        read(http, f"{mirror.url}/v2/alpine/manifests/latest"), 60)
    assert status == 429 and 100 <= int(headers["Retry-After"]) <= 120
    assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert upstream.proxy.count(contains="/v2/library/alpine/manifests/") == 1
