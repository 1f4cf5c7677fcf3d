"""Many nodes at once: one upstream request per blob, manifest, tag check and token; bounded
upstream concurrency. (Speed is measured in bench/, not here.)"""

import asyncio

import pytest

from tests.conftest import fetched

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
MiB = 1 << 20


async def pull(http, mirror, name, tag):
    """What a client does: the manifest by tag, then every blob it names; returns the bytes."""
    async with http.get(f"{mirror.url}/v2/{name}/manifests/{tag}", headers=ACCEPT) as resp:
        assert resp.status == 200
        manifest = await resp.json(content_type=None)
    blobs = {}
    for descriptor in [manifest["config"], *manifest["layers"]]:
        async with http.get(f"{mirror.url}/v2/{name}/blobs/{descriptor['digest']}") as resp:
            assert resp.status == 200
            blobs[descriptor["digest"]] = await resp.read()
    return blobs


@pytest.mark.parametrize("clients", [8, 32, 64])
async def test_concurrent_cold_pulls_fetch_each_blob_and_manifest_once(mirror, http, upstream,
                                                                       clients):
    alpine = upstream.images["library/alpine"]
    upstream.proxy.throttle(8 * MiB, match="/blobs/")  # so the clients truly overlap
    results = await asyncio.gather(*(pull(http, mirror, "library/alpine", "3.19")
                                     for _ in range(clients)))
    assert all(blobs == alpine.blobs for blobs in results)
    assert fetched(upstream, "GET", "/manifests/3.19") == 1
    for digest in alpine.blobs:
        assert fetched(upstream, "GET", digest) == 1
    body = sum(r.sent for r in upstream.proxy.records if r.status == 200 and "/blobs/" in r.path)
    assert body == sum(len(b) for b in alpine.blobs.values())


async def test_concurrent_revalidations_share_one_head(start_mirror, http, upstream):
    mirror = await start_mirror(tag_ttl=0)
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    async with http.get(url, headers=ACCEPT) as resp:
        assert resp.status == 200
    upstream.proxy.reset()
    upstream.proxy.delay(0.3, match="/manifests/2.0", method="HEAD")

    async def get():
        async with http.get(url, headers=ACCEPT) as resp:
            return await resp.read()
    bodies = await asyncio.gather(*(get() for _ in range(32)))
    assert set(bodies) == {upstream.images["team/app"].manifest}
    assert upstream.proxy.requests == [("HEAD", "/v2/team/app/manifests/2.0")]


async def test_concurrent_first_requests_share_one_token(mirror, http, upstream):
    alpine = upstream.images["library/alpine"]

    async def get(digest):
        async with http.get(f"{mirror.url}/v2/library/alpine/blobs/{digest}") as resp:
            return await resp.read()
    bodies = await asyncio.gather(*(get(d) for d in alpine.blobs for _ in range(4)))
    assert sorted(bodies) == sorted(list(alpine.blobs.values()) * 4)
    assert len(upstream.tokens.requests) == 1


async def test_upstream_concurrency_is_bounded_and_the_rest_queues(start_mirror, http, upstream):
    mirror = await start_mirror(limits={"upstream_requests_per_upstream": 2})
    images = [upstream.push_image(f"test/bounded{i}", "v", seed=f"bounded{i}") for i in range(5)]
    digests = [image.layer_digests[0] for image in images]
    names = [image.name for image in images]
    # Held before the headers: a request slot covers connecting and the headers only.
    upstream.proxy.hold(match="/blobs/", method="GET")

    async def get(name, digest):
        async with http.get(f"{mirror.url}/v2/{name}/blobs/{digest}") as resp:
            return resp.status, await resp.read()
    tasks = [asyncio.ensure_future(get(n, d)) for n, d in zip(names, digests)]
    for _ in range(100):
        await asyncio.sleep(0.02)
        if upstream.proxy.stalled >= 2:
            break
    await asyncio.sleep(0.3)
    assert upstream.proxy.stalled == 2  # two in flight, three waiting in the mirror
    upstream.proxy.release()
    results = await asyncio.gather(*tasks)
    assert [body for _, body in results] == [images[i].blobs[d] for i, d in enumerate(digests)]


async def test_global_limit_bounds_requests_over_all_upstreams(start_mirror, http, upstream):
    mirror = await start_mirror(limits={"upstream_requests": 2})
    images = [upstream.push_image(f"test/global{i}", "v", seed=f"global{i}") for i in range(4)]
    # Held before the headers: a request slot covers connecting and the headers only.
    upstream.proxy.hold(match="/blobs/", method="GET")

    async def get(prefix, image):
        url = f"{mirror.url}/v2/{prefix}{image.name}/blobs/{image.layer_digests[0]}"
        async with http.get(url) as resp:
            return await resp.read()
    # Two through docker.io (the default), two through quay.io (by prefix).
    tasks = [asyncio.ensure_future(get(prefix, image))
             for prefix, image in zip(["", "", "quay.io/", "quay.io/"], images)]
    for _ in range(100):
        await asyncio.sleep(0.02)
        if upstream.proxy.stalled >= 2:
            break
    await asyncio.sleep(0.3)
    assert upstream.proxy.stalled == 2
    upstream.proxy.release()
    assert await asyncio.gather(*tasks) == [i.blobs[i.layer_digests[0]] for i in images]


async def test_range_on_a_blob_in_flight_is_served_as_soon_as_its_bytes_exist(mirror, http,
                                                                             upstream):
    alpine = upstream.images["library/alpine"]
    digest = max(alpine.layer_digests, key=lambda d: len(alpine.blobs[d]))
    upstream.proxy.throttle(MiB, match=digest)  # about 3 s for the whole layer
    first = asyncio.ensure_future(http.get(f"{mirror.url}/v2/library/alpine/blobs/{digest}"))
    while digest not in mirror.proxy.fills.active:
        await asyncio.sleep(0.01)
    async with http.get(f"{mirror.url}/v2/library/alpine/blobs/{digest}",
                        headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 206 and await resp.read() == alpine.blobs[digest][100:200]
    assert digest in mirror.proxy.fills.active  # answered long before the fill ended
    (await first).close()
