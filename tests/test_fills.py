"""Fills that fail per route: one requester's bogus repository or down `?ns=` upstream does
not fail the other readers of the same digest; kept partial downloads hold only the bytes
they have and can be given up for space.

Both upstreams of these mirrors lead to the same registry (the bytes of a digest are the
same through either), docker.io through the session's fault proxy and quay.io through a
second fault proxy of its own, so one upstream can go down while the other stays up.
"""

import asyncio

import aiohttp
import pytest

from mirror import config as cfg
from mirror import metrics
from mirror.metrics import METRICS
from tests.conftest import fetched
from tests.support.faultproxy import FaultProxy
from tests.test_blobs import blob_url, committed, get

MiB = 1 << 20


@pytest.fixture
def quay(upstream):
    """A second fault proxy in front of the test registry, for quay.io only."""
    proxy = FaultProxy(upstream.registry_url).start(upstream.thread)
    yield proxy
    proxy.clear_faults()
    proxy.down()


@pytest.fixture
async def two_upstreams(start_mirror, upstream, quay):
    return await start_mirror(upstreams=(
        cfg.Upstream("docker.io", upstream.url, default=True, aliases=("hub",)),
        cfg.Upstream("quay.io", quay.url, aliases=("quay",)),
    ))


async def fill_of(mirror, digest, until=lambda fill: True):
    while (fill := mirror.proxy.fills.active.get(digest)) is None or not until(fill):
        await asyncio.sleep(0.01)
    return fill


async def token_first(mirror, http, name="library/alpine", tag="latest"):
    """Pull the manifest, so the mirror holds a token for `name` and a one-shot fault set on
    a blob GET hits its body, not the 401 that precedes the first token."""
    async with http.get(f"{mirror.url}/v2/{name}/manifests/{tag}") as resp:
        assert resp.status == 200


def gets(proxy, digest, challenges=False):
    """The GETs of `digest` a proxy forwarded (not the 401s that precede a token)."""
    return [r for r in proxy.records if r.method == "GET" and digest in r.path
            and (challenges or r.status != 401)]


async def test_bogus_repository_requester_does_not_fail_a_legitimate_reader(
        mirror, http, upstream, big):
    digest, data = big
    # The bogus name's upstream answer (401: the repository does not exist) comes late, so
    # the legitimate reader joins the fill while it is still bound to the bogus route.
    upstream.proxy.delay(0.5, match=f"/v2/nobody/nothing/blobs/{digest}")
    bogus = asyncio.ensure_future(get(http, blob_url(mirror, digest, "nobody/nothing")))
    fill = await fill_of(mirror, digest)
    legitimate = asyncio.ensure_future(get(http, blob_url(mirror, digest)))
    await fill_of(mirror, digest, lambda f: f.readers == 2)
    assert not fill.verified
    (bogus_status, _, bogus_body), (status, _, body) = await asyncio.gather(bogus, legitimate)
    assert (status, body) == (200, data)
    # The bytes are the same whichever route delivered them, and checked against the digest:
    # the bogus requester gets them too rather than an error.
    assert (bogus_status, bogus_body) == (200, data)
    await committed(mirror, digest)
    assert [p.read_bytes() for p in mirror.blob_files()] == [data]
    assert [r.status for r in gets(upstream.proxy, "nobody/nothing", challenges=True)] == [401, 401]
    assert fetched(upstream, "GET", f"library/alpine/blobs/{digest}") == 1
    assert metrics.total(mirror.server.app[METRICS].fills_failed) == 0


async def test_down_ns_upstream_mid_body_hands_over_to_another_readers_upstream(
        two_upstreams, http, upstream, quay, big):
    mirror, (digest, data) = two_upstreams, big
    quay.throttle(MiB, match=digest)
    via_quay = asyncio.ensure_future(get(http, blob_url(mirror, digest) + "?ns=quay.io"))
    fill = await fill_of(mirror, digest, lambda f: f.written >= 512 * 1024)
    via_hub = asyncio.ensure_future(get(http, blob_url(mirror, digest)))
    await fill_of(mirror, digest, lambda f: f.readers == 2)
    had = fill.written
    quay.down()  # mid-body: quay.io's connection is reset and it refuses new ones
    (quay_status, _, quay_body), (hub_status, _, hub_body) = await asyncio.gather(via_quay,
                                                                                 via_hub)
    assert (quay_status, quay_body) == (200, data)
    assert (hub_status, hub_body) == (200, data)
    await committed(mirror, digest)
    assert [p.read_bytes() for p in mirror.blob_files()] == [data]
    # docker.io was asked only for the rest, from where quay.io broke off.
    [rest] = gets(upstream.proxy, digest)
    assert rest.status == 206
    assert len(data) - had - MiB <= rest.sent <= len(data) - had
    assert [r.status for r in gets(quay, digest)] == [200]


async def test_ns_upstream_failing_before_the_body_hands_over_to_another_readers_upstream(
        two_upstreams, http, upstream, quay, big):
    mirror, (digest, data) = two_upstreams, big
    quay.delay(0.5, match=digest)
    quay.status(503, match=digest)
    via_quay = asyncio.ensure_future(get(http, blob_url(mirror, digest) + "?ns=quay.io"))
    await fill_of(mirror, digest)
    via_hub = asyncio.ensure_future(get(http, blob_url(mirror, digest)))
    await fill_of(mirror, digest, lambda f: f.readers == 2)
    results = await asyncio.gather(via_quay, via_hub)
    assert [(status, body) for status, _, body in results] == [(200, data), (200, data)]
    assert [r.status for r in gets(upstream.proxy, digest)] == [200]  # from byte 0
    assert [r.status for r in gets(quay, digest)] == [503]


async def test_route_that_failed_once_is_not_asked_again_and_all_routes_failing_fail_once(
        two_upstreams, http, upstream, quay):
    """A digest no upstream has: each route is asked once, and every reader gets 404."""
    mirror, digest = two_upstreams, "sha256:" + "e" * 64
    quay.delay(0.5, match=digest)
    first = asyncio.ensure_future(get(http, blob_url(mirror, digest) + "?ns=quay.io"))
    await fill_of(mirror, digest)
    second = asyncio.ensure_future(get(http, blob_url(mirror, digest)))
    third = asyncio.ensure_future(get(http, blob_url(mirror, digest) + "?ns=quay.io"))
    results = await asyncio.gather(first, second, third)
    assert [status for status, _, _ in results] == [404, 404, 404]
    assert all(b'"BLOB_UNKNOWN"' in body for _, _, body in results)
    assert len(gets(upstream.proxy, digest)) == 1 and len(gets(quay, digest)) == 1
    assert mirror.blob_files() == [] and list((mirror.root / "tmp").iterdir()) == []


async def read_short(http, url) -> int:
    received = 0
    async with http.get(url) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += len(chunk)
    return received


async def test_broken_off_download_keeps_only_its_bytes_and_can_be_given_up(
        mirror, http, upstream, big):
    digest, data = big
    await token_first(mirror, http)
    # Throttled: the bytes before the cut are read as they come, none is still buffered
    # (and lost) when the connection resets.
    upstream.proxy.throttle(8 * MiB, match=digest)
    upstream.proxy.cut(at=MiB, match=digest, times=1)
    await read_short(http, blob_url(mirror, digest))
    await committed(mirror, digest)
    fills = mirror.proxy.fills
    [spool] = list((mirror.root / "tmp").iterdir())
    # Truncated to what arrived: not the whole blob's preallocated size.
    kept = spool.stat()
    assert 0 < kept.st_size <= MiB < len(data)
    assert kept.st_blocks * 512 <= MiB + 64 * 1024  # no preallocated blocks held either
    assert fills.partial_bytes() == kept.st_size
    assert fills.release_partials(1) == kept.st_size
    assert fills.partial_bytes() == 0 and list((mirror.root / "tmp").iterdir()) == []
    # Given up: the next fill starts from byte 0 again.
    assert (await get(http, blob_url(mirror, digest)))[2] == data
    assert [r.status for r in gets(upstream.proxy, digest)] == [200, 200]


async def test_partials_are_released_oldest_first_until_enough_is_freed(
        mirror, http, upstream):
    alpine = upstream.images["library/alpine"]
    first = max(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    pushed = upstream.push_image("fills/partials", "v1", "partials", size=2 * MiB)
    second = max(pushed.layer_digests, key=lambda d: len(pushed.blobs[d]))
    for digest, name, tag in ((first, "library/alpine", "latest"),
                              (second, "fills/partials", "v1")):
        await token_first(mirror, http, name, tag)
        upstream.proxy.throttle(8 * MiB, match=digest)
        upstream.proxy.cut(at=512 * 1024, match=digest, times=1)
        await read_short(http, blob_url(mirror, digest, name))
        await committed(mirror, digest)
        assert list(mirror.proxy.fills.partials)[-1] == digest
    fills = mirror.proxy.fills
    assert list(fills.partials) == [first, second]
    oldest = fills.partials[first].written
    assert 0 < oldest <= 512 * 1024
    assert fills.release_partials(1) == oldest
    assert list(fills.partials) == [second]
    assert [p.name for p in (mirror.root / "tmp").iterdir()] == [fills.partials[second].spool.name]
