"""Three replicas on one Redis and one SeaweedFS bucket, as real processes on loopback.

What a Deployment of N replicas behind a round-robin load balancer must do: a push whose
requests land on different replicas works and is pulled byte-exact through the others; an
image cached through one replica is served by another with no upstream request; Redis and
the object store going away degrade it as decided (docs/cluster.md) and never give a 500;
the byte budget evicts for the whole cluster; a replica killed mid-upload leaves nothing
visible and nothing the sweep does not reclaim.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import fetched
from tests.support.cluster import MiB, RoundRobin, push_spread, s3_client
from tests.support.images import build_image, random_bytes, small_image
from tests.support.process import get_blob, pull, sha256, wait_until, with_digest
from tests.support.redis import RedisServer
from tests.support.seaweed import SeaweedFS

pytestmark = pytest.mark.timeout(150)


def two_layer_image(name: str, seed: str):
    return build_image(name, ["v1"], [{"big.bin": random_bytes(6 * MiB, seed)},
                                      {"small.txt": seed.encode()}], oci=True)


async def test_a_push_spread_over_three_replicas_is_pulled_byte_exact_through_the_others(
        cluster_factory, http):
    cluster = cluster_factory()
    image = two_layer_image("team/spread", "spread")
    lb = RoundRobin(http, cluster.urls)
    await push_spread(lb, image, chunk=MiB)
    assert set(lb.used) == set(cluster.urls)  # every replica took part of the push
    for base in cluster.urls[1:]:
        pulled = await pull(http, base, image.name, "v1")
        assert pulled.digest == image.digest
        assert pulled.blobs == {d: b for d, b in image.blobs.items()}
    for base in cluster.urls:
        async with http.get(f"{base}/v2/_catalog") as resp:
            assert image.name in (await resp.json())["repositories"]
        async with http.get(f"{base}/v2/{image.name}/tags/list") as resp:
            assert (await resp.json())["tags"] == ["v1"]
    objects = cluster.objects()
    # Every blob is one object under its digest; no upload chunk is left behind.
    for digest, data in image.blobs.items():
        assert objects[f"blobs/sha256/{digest.partition(':')[2]}"] == len(data)
    assert not [name for name in objects if name.startswith("uploads/")]


async def test_a_chunk_out_of_order_on_another_replica_is_refused_and_nothing_lands(
        cluster_factory, http):
    cluster = cluster_factory(count=2)
    one, two = cluster.urls
    data = random_bytes(2 * MiB, "order")
    async with http.post(f"{one}/v2/team/order/blobs/uploads/") as resp:
        location = resp.headers["Location"]
    async with http.patch(two + location, data=data[:MiB],
                          headers={"Content-Range": f"0-{MiB - 1}"}) as resp:
        assert resp.status == 202
    async with http.patch(one + location, data=data[:MiB],
                          headers={"Content-Range": f"0-{MiB - 1}"}) as resp:
        assert resp.status == 416  # replica one knows what replica two stored
        assert resp.headers["Range"] == f"0-{MiB - 1}"
    async with http.put(with_digest(one + location, sha256(data))) as resp:
        assert resp.status == 400  # half a blob: its digest is wrong
        assert (await resp.json())["errors"][0]["code"] == "DIGEST_INVALID"
    assert f"blobs/sha256/{sha256(data).partition(':')[2]}" not in cluster.objects()


async def test_an_image_cached_through_one_replica_is_served_by_another_with_no_upstream_request(
        cluster_factory, upstream, http):
    cluster = cluster_factory()
    image = upstream.images["library/alpine"] if "library/alpine" in upstream.images else \
        next(iter(upstream.images.values()))
    tag = image.tags[0]
    first = await pull(http, cluster.urls[0], image.name, tag)
    assert fetched(upstream) > 0
    # Cached = committed to the bucket, which a fill does right after its last byte went
    # out (a pull elsewhere before that fetches again: one fetch per replica, issue 12).
    wanted = {f"blobs/sha256/{d.partition(':')[2]}" for d in first.blobs}
    assert await wait_until(lambda: wanted <= set(cluster.objects("blobs/")), timeout=20,
                            interval=0.1)
    upstream.reset()
    for base in cluster.urls[1:]:
        again = await pull(http, base, image.name, tag)
        assert again.digest == first.digest and again.blobs == first.blobs
    assert fetched(upstream) == 0, [r.path for r in upstream.proxy.records]


async def test_a_blob_read_through_a_replica_without_a_local_tier_honours_ranges(
        cluster_factory, http):
    cluster = cluster_factory(count=2, local_tier=False)
    image = two_layer_image("team/ranges", "ranges")
    lb = RoundRobin(http, cluster.urls)
    await push_spread(lb, image, chunk=4 * MiB)
    big = max(image.blobs.values(), key=len)
    digest = sha256(big)
    async with http.get(f"{cluster.urls[1]}/v2/team/ranges/blobs/{digest}",
                        headers={"Range": "bytes=1000-1999"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 1000-1999/{len(big)}"
        assert await resp.read() == big[1000:2000]
    # Docker's and containerd's resume: `bytes=N-`, which must be a 206 with Content-Range.
    resume = len(big) - 12345
    async with http.get(f"{cluster.urls[1]}/v2/team/ranges/blobs/{digest}",
                        headers={"Range": f"bytes={resume}-"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {resume}-{len(big) - 1}/{len(big)}"
        assert await resp.read() == big[resume:]
    # zstd:chunked's multi-range: each part's bytes from the object.
    async with http.get(f"{cluster.urls[0]}/v2/team/ranges/blobs/{digest}",
                        headers={"Range": "bytes=0-9,5000000-5000009"}) as resp:
        assert resp.status == 206
        body = await resp.read()
    assert big[0:10] in body and big[5000000:5000010] in body
    assert resp.headers["Content-Type"].startswith("multipart/byteranges")


async def test_redis_down_serves_by_digest_and_stale_tags_without_a_500_then_recovers(
        cluster_factory, upstream, http, tmp_path):
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        cluster = cluster_factory(redis_url=redis.url)
        one, two, three = cluster.urls
        hosted = two_layer_image("team/during", "during")
        await push_spread(RoundRobin(http, cluster.urls), hosted, chunk=4 * MiB)
        cached = next(iter(upstream.images.values()))
        tag = cached.tags[0]
        first = await pull(http, one, cached.name, tag)

        redis.stop()
        statuses = []
        # By digest: the manifest's copy and the blobs are in the object store.
        for base in (two, three):
            pulled = await pull(http, base, hosted.name, hosted.digest)
            assert pulled.blobs == hosted.blobs
            pulled = await pull(http, base, cached.name, first.digest)
            assert pulled.blobs == first.blobs
        # By tag, on the replica that saw it: served stale from what it last saw.
        assert (await pull(http, one, cached.name, tag)).digest == first.digest
        async with http.get(f"{one}/readyz") as resp:
            ready = await resp.json()
            assert resp.status == 200 and ready["status"] == "degraded", ready
            assert "index" in ready["degraded"]
        # A push cannot be recorded: a 503 that says to retry, never a 500.
        async with http.post(f"{two}/v2/team/later/blobs/uploads/") as resp:
            statuses.append(resp.status)
            assert resp.status == 503 and "Retry-After" in resp.headers, await resp.text()
        async with http.get(f"{three}/v2/_catalog") as resp:
            statuses.append(resp.status)
        assert 500 not in statuses

        redis.start()
        await asyncio.sleep(0.5)
        # Everything is back, pushes included, on every replica.
        later = small_image("team/later", ["v1"], "later")
        await push_spread(RoundRobin(http, cluster.urls), later, chunk=MiB)
        for base in cluster.urls:
            assert (await pull(http, base, later.name, "v1")).digest == later.digest
            assert (await pull(http, base, hosted.name, "v1")).digest == hosted.digest
            async with http.get(f"{base}/readyz") as resp:
                assert (await resp.json())["status"] == "ok"
    finally:
        redis.stop()


async def test_object_store_down_serves_the_local_tier_and_misses_503_then_recovers(
        cluster_factory, http, tmp_path):
    store = SeaweedFS(tmp_path / "seaweed").start()
    try:
        cluster = cluster_factory(count=2, store=store)
        one, two = cluster.urls
        image = two_layer_image("team/s3down", "s3down")
        await push_spread(RoundRobin(http, [one]), image, chunk=8 * MiB)
        await pull(http, one, image.name, "v1")  # into replica one's local tier
        store.stop()
        pulled = await pull(http, one, image.name, image.digest)  # local tier + Redis
        assert pulled.blobs == image.blobs
        big = max(image.blobs, key=lambda d: len(image.blobs[d]))
        async with http.get(f"{two}/v2/{image.name}/blobs/{big}") as resp:
            assert resp.status == 503, await resp.text()
            assert resp.headers.get("Retry-After")
            assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
        async with http.get(f"{two}/readyz") as resp:
            ready = await resp.json()
            assert resp.status == 200 and "object_store" in ready["degraded"], ready
        store.start()
        assert await get_blob(http, two, image.name, big) == image.blobs[big]
    finally:
        store.stop()


async def test_the_budget_evicts_for_the_whole_cluster(cluster_factory, upstream, http):
    budget = 3 * MiB
    cluster = cluster_factory(storage={"max_size": budget, "keep_recent": 0.0})
    images = [upstream.push_image(f"team/evict{i}", "v1", f"evict{i}", size=MiB)
              for i in range(6)]
    for i, image in enumerate(images):
        await pull(http, cluster.urls[i % 3], image.name, "v1")

    def blob_bytes() -> int:
        return sum(size for name, size in cluster.objects("blobs/").items())

    pulled = {f"blobs/sha256/{d.partition(':')[2]}": len(b) for image in images
              for d, b in image.blobs.items()}
    assert sum(pulled.values()) > budget  # more than the budget went through the cluster
    settled = await wait_until(lambda: blob_bytes() <= budget * 0.95, timeout=40, interval=0.5)
    assert settled, f"{blob_bytes()} bytes of blobs left in the bucket (budget {budget})"
    assert set(pulled) - set(cluster.objects("blobs/")), "nothing was evicted from the bucket"
    # The evicted images are still pullable (fetched again), byte-exact, on any replica.
    for i, image in enumerate(images):
        pulled = await pull(http, cluster.urls[(i + 1) % 3], image.name, "v1")
        assert pulled.digest == image.digest
    evictors = [r for r in cluster.replicas if "evicted" in r.log_text()]
    assert evictors, "no replica logged an eviction"


async def test_a_replica_killed_mid_upload_leaves_nothing_visible_and_the_sweep_reclaims_it(
        cluster_factory, http):
    cluster = cluster_factory(count=2, hosted={"upload_ttl": 3.0})
    one, two = cluster.urls
    data = random_bytes(40 * MiB, "killed")
    async with http.post(f"{one}/v2/team/killed/blobs/uploads/") as resp:
        location = resp.headers["Location"]
    sent = 0

    async def body():
        nonlocal sent
        for start in range(0, len(data), MiB):
            yield data[start:start + MiB]
            sent += MiB
            await asyncio.sleep(0.02)

    request = asyncio.ensure_future(http.patch(one + location, data=body(),
                                               headers={"Content-Type": "application/octet-stream"}))
    assert await wait_until(lambda: sent >= 24 * MiB, timeout=30)
    cluster.replicas[0].kill()
    with pytest.raises(aiohttp.ClientError):
        resp = await request
        await resp.read()
    assert f"blobs/sha256/{sha256(data).partition(':')[2]}" not in cluster.objects()
    # The other replica's sweep (every ttl/2) aborts the killed one's multipart upload of
    # the chunk and forgets the expired record: nothing is left in the bucket.
    async with http.get(f"{two}{location}") as resp:
        assert resp.status in (204, 404)
    reclaimed = await wait_until(lambda: not cluster.multipart_uploads()
                                 and not cluster.objects("uploads/"), timeout=30, interval=0.5)
    assert reclaimed, (cluster.multipart_uploads(),
                       cluster.objects("uploads/"))


async def test_with_redirect_a_stored_blob_is_a_307_to_a_presigned_url_of_its_object(
        cluster_factory, http):
    cluster = cluster_factory(count=2, local_tier=False, **{"storage.s3": {"redirect": True}})
    image = small_image("team/redirect", ["v1"], "redirect", size=256 * 1024)
    await push_spread(RoundRobin(http, cluster.urls), image, chunk=MiB)
    layer = image.layer_digests[0]
    async with http.get(f"{cluster.urls[1]}/v2/{image.name}/blobs/{layer}",
                        allow_redirects=False) as resp:
        assert resp.status == 307
        assert resp.headers["Docker-Content-Digest"] == layer
        location = resp.headers["Location"]
    assert location.startswith(cluster.seaweed.endpoint) and "X-Amz-Signature=" in location
    async with http.get(location) as resp:  # straight from the object store
        assert resp.status == 200
        assert await resp.read() == image.blobs[layer]


async def test_the_local_tier_stays_within_its_bound_and_refills_from_the_bucket(
        cluster_factory, http):
    cluster = cluster_factory(count=2, storage={"local_cache_size": 8 * MiB})
    one, two = cluster.urls
    images = [two_layer_image(f"team/tier{i}", f"tier{i}") for i in range(3)]
    for image in images:
        await push_spread(RoundRobin(http, [two]), image, chunk=8 * MiB)
    for _ in range(2):  # the second round reads what the bound pushed out, from the bucket
        for image in images:
            pulled = await pull(http, one, image.name, "v1")
            assert pulled.blobs == image.blobs
    root = cluster.replicas[0].root / "blobs"

    def held() -> int:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    # A copy still being sent when the next one came in stays until the next check (5 s).
    assert await wait_until(lambda: 0 < held() <= 8 * MiB, timeout=15, interval=0.2), held()


async def test_a_monolithic_push_and_a_cancelled_upload_on_a_cluster(cluster_factory, http):
    cluster = cluster_factory(count=2)
    one, two = cluster.urls
    data = random_bytes(300 * 1024, "monolithic")
    async with http.post(f"{one}/v2/team/mono/blobs/uploads/?digest={sha256(data)}",
                         data=data) as resp:
        assert resp.status == 201, await resp.text()
    assert await get_blob(http, two, "team/mono", sha256(data)) == data
    async with http.post(f"{two}/v2/team/mono/blobs/uploads/") as resp:
        location = resp.headers["Location"]
    async with http.patch(one + location, data=b"x" * 1000) as resp:
        assert resp.status == 202
    async with http.delete(two + location) as resp:
        assert resp.status == 204
    async with http.get(one + location) as resp:
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert not cluster.objects("uploads/")


async def test_the_per_client_upload_cap_counts_across_replicas(cluster_factory, http):
    cluster = cluster_factory(count=2, hosted={"max_uploads_per_client": 2})
    one, two = cluster.urls
    started = []
    for base in (one, two):
        async with http.post(f"{base}/v2/team/cap/blobs/uploads/") as resp:
            assert resp.status == 202
            started.append(resp.headers["Location"])
    async with http.post(f"{one}/v2/team/cap/blobs/uploads/") as resp:
        assert resp.status == 429 and resp.headers["Retry-After"]
        assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
    async with http.delete(one + started[1]) as resp:  # started on two, cancelled on one
        assert resp.status == 204
    async with http.post(f"{two}/v2/team/cap/blobs/uploads/") as resp:
        assert resp.status == 202


@pytest.mark.parametrize("local_tier", [True, False])
async def test_an_object_evicted_by_another_replica_is_fetched_again_not_a_404(
        cluster_factory, upstream, http, local_tier):
    cluster = cluster_factory(count=2, local_tier=local_tier)
    one, two = cluster.urls
    image = upstream.push_image(f"team/gone{int(local_tier)}", "v1", f"gone{local_tier}",
                                size=512 * 1024)
    await pull(http, one, image.name, "v1")
    layer = image.layer_digests[0]
    key = f"blobs/sha256/{layer.partition(':')[2]}"
    assert await wait_until(lambda: key in cluster.objects("blobs/"), timeout=20)
    async with http.head(f"{two}/v2/{image.name}/blobs/{layer}") as resp:
        assert resp.status == 200  # replica two now knows the object is there
    s3_client(cluster.seaweed).delete_object(Bucket=cluster.bucket, Key=key)  # evicted
    upstream.reset()
    assert await get_blob(http, two, image.name, layer) == image.blobs[layer]
    assert fetched(upstream, "GET", layer) == 1


async def test_a_lease_has_one_holder_and_a_lapsed_holder_cannot_touch_the_next(
        redis_url_prefix):
    """cluster/lease.py on a real Redis: what the eviction pass and every fill rely on."""
    import redis.asyncio as aioredis

    from mirror.cluster.lease import Lease

    url, prefix = redis_url_prefix
    client = aioredis.from_url(url)
    try:
        key = f"{prefix}lease:test"
        first, second = (Lease(client, key, holder, ttl=0.3) for holder in ("r1", "r2"))
        assert await first.acquire() and not await second.acquire()
        assert await client.get(key) == b"r1"  # a plain GET tells who holds it
        assert await first.renew()
        await asyncio.sleep(0.5)  # r1 stops renewing (a replica killed): the lease lapses
        assert await second.acquire()
        assert not await first.renew()
        await first.release()  # must not delete r2's lease
        assert await client.get(key) == b"r2"
        await second.release()
        assert await client.get(key) is None
    finally:
        await client.aclose()
