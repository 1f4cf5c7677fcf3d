"""One upstream fetch per digest across three replicas: leases in Redis, followers stream
from the holder, a follower takes over when the holder is killed, Redis down fails open.

Real processes on loopback: three `mirror serve` on one redis-server and one SeaweedFS
bucket, the upstream a real Distribution behind the counting fault proxy."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis as redis_sync

from mirror.cluster import peers
from tests.conftest import fetched
from tests.support.cluster import SECRET, MiB
from tests.support.images import small_image
from tests.support.process import get_blob, pull, sha256, wait_until
from tests.support.redis import RedisServer

pytestmark = pytest.mark.timeout(240)


async def pull_all(http, urls: list[str], name: str, tag: str, clients: int):
    """`clients` pulls of name:tag at once, round-robin over the replicas."""
    return await asyncio.gather(*(pull(http, urls[i % len(urls)], name, tag)
                                  for i in range(clients)))


async def test_32_clients_over_3_replicas_make_one_upstream_fetch_per_blob_and_manifest(
        cluster_factory, upstream, http):
    cluster = cluster_factory()
    image = upstream.push_image("team/herd", "v1", "herd", size=8 * MiB)
    upstream.reset()
    upstream.proxy.throttle(16 * MiB, match="/blobs/")  # the herd arrives mid-download
    pulled = await pull_all(http, cluster.urls, image.name, "v1", 32)
    for result in pulled:
        assert result.digest == image.digest and result.blobs == image.blobs
    for digest in image.blobs:
        assert fetched(upstream, "GET", digest) == 1, \
            [(r.method, r.path) for r in upstream.proxy.records]
    assert fetched(upstream, "GET", "/manifests/") == 1
    assert fetched(upstream, "HEAD", "/manifests/") <= 1
    # Each blob had exactly one holder in the cluster; the others followed it.
    roles = {"holder": 0.0, "follower": 0.0, "alone": 0.0}
    for base in cluster.urls:
        async with http.get(f"{base}/metrics") as resp:
            for line in (await resp.text()).splitlines():
                for role in roles:
                    if line.startswith(f'mirror_cluster_fills_total{{role="{role}"}}'):
                        roles[role] += float(line.split()[-1])
    assert roles["holder"] == len(image.blobs) and roles["alone"] == 0, roles
    assert roles["follower"] >= 1, roles
    # One copy into the bucket per blob, by its holder: the followers keep local copies.
    texts = [r.log_text() for r in cluster.replicas]
    for digest in image.blobs:
        assert sum(text.count(f"uploaded {digest}") for text in texts) == 1, digest
    async with http.get(f"{cluster.urls[0]}/") as resp:
        page = await resp.text()
    assert "Cluster: 3 replica(s)" in page and "r1 (this one)" in page and "r3" in page


async def test_a_signed_request_is_the_only_way_into_the_internal_endpoint(
        cluster_factory, http):
    cluster = cluster_factory(count=1)
    image = small_image("team/peer", ["v1"], "peer")
    for data in image.blobs.values():
        async with http.post(f"{cluster.urls[0]}/v2/team/peer/blobs/uploads/"
                             f"?digest={sha256(data)}", data=data) as resp:
            assert resp.status == 201, await resp.text()
    digest = image.layer_digests[0]
    path = f"{peers.PATH}{digest}"
    for header in ({}, {peers.HEADER: peers.sign("wrong-secret-0123456789", "r9", path)},
                   {peers.HEADER: peers.sign(SECRET, "r9", path, now=time.time() - 600)},
                   {peers.HEADER: peers.sign(SECRET, "r9", f"{peers.PATH}sha256:{'0' * 64}")}):
        async with http.get(cluster.urls[0] + path, headers=header) as resp:
            assert resp.status == 404, header
            assert await resp.read() != image.blobs[digest]
    async with http.get(cluster.urls[0] + path,
                        headers={peers.HEADER: peers.sign(SECRET, "r9", path)}) as resp:
        assert resp.status == 200 and await resp.read() == image.blobs[digest]


def holder_of(cluster, digest: str) -> str | None:
    client = redis_sync.Redis.from_url(cluster.replicas[0].settings["cluster"]["redis"])
    try:
        value = client.get(f"{cluster.name}:fill:{digest}")
    finally:
        client.close()
    return json.loads(value)["replica"] if value else None


async def test_the_holder_killed_at_40_percent_its_followers_clients_complete_byte_exact(
        cluster_factory, upstream, http):
    layer_mib = 512
    cluster = cluster_factory()
    image = upstream.push_image("team/takeover", "v1", "takeover", size=layer_mib * MiB)
    layer = image.layer_digests[0]
    size = len(image.blobs[layer])
    for base in cluster.urls:  # every replica knows the manifest: the test is the layer
        await pull_manifest(http, base, image)
    upstream.reset()
    upstream.proxy.throttle(24 * MiB, match=layer)
    progress: dict[int, int] = {}

    async def client(i: int) -> bytes:
        base = cluster.urls[i % 3]
        async with http.get(f"{base}/v2/{image.name}/blobs/{layer}") as resp:
            assert resp.status == 200
            body = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 20):
                body += chunk
                progress[i] = len(body)
            return bytes(body)

    tasks = [asyncio.ensure_future(client(i)) for i in range(9)]
    assert await wait_until(lambda: holder_of(cluster, layer) is not None, timeout=30)
    holder = holder_of(cluster, layer)
    victim = next(i for i, r in enumerate(cluster.replicas)
                  if r.settings["cluster"]["replica"] == holder)
    assert await wait_until(lambda: max(progress.values(), default=0) >= 0.4 * size,
                            timeout=60, interval=0.05)
    cluster.replicas[victim].kill()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for i, result in enumerate(results):
        if i % 3 == victim:
            continue  # its clients end short, as on a cut
        assert isinstance(result, bytes), (i, result)
        assert sha256(result) == layer
    sent = upstream.proxy.body_bytes(contains=layer)
    assert sent <= 1.6 * size, f"{sent / size:.2f}x the layer came from the upstream"
    print(f"upstream bytes: {sent / size:.2f}x the layer")
    survivors = [r for i, r in enumerate(cluster.replicas) if i != victim]
    assert any("taking over the fill" in r.log_text() for r in survivors)


async def pull_manifest(http, base: str, image) -> None:
    async with http.get(f"{base}/v2/{image.name}/manifests/v1",
                        headers={"Accept": image.media_type}) as resp:
        assert resp.status == 200
        assert await resp.read() == image.manifest


async def test_with_redis_stopped_each_replica_fills_alone_and_every_pull_completes(
        cluster_factory, upstream, http, tmp_path):
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    try:
        cluster = cluster_factory(redis_url=redis.url)
        image = upstream.push_image("team/alone", "v1", "alone", size=2 * MiB)
        redis.stop()
        started = time.monotonic()
        pulled = await pull_all(http, cluster.urls, image.name, "v1", 6)
        assert all(p.blobs == image.blobs for p in pulled)
        assert time.monotonic() - started < 30  # no hang on the missing Redis
        async with http.get(f"{cluster.urls[0]}/metrics") as resp:
            text = await resp.text()
        assert 'mirror_cluster_fills_total{role="alone"}' in text or \
            "mirror_cluster_lease_failures_total" in text
    finally:
        redis.stop()


async def test_a_429_on_one_replica_pauses_that_upstream_for_the_whole_cluster(
        cluster_factory, upstream, http):
    cluster = cluster_factory(count=2)
    one, two = cluster.urls
    image = upstream.push_image("team/slow-down", "v1", "slow-down", size=64 * 1024)
    upstream.reset()
    upstream.proxy.status(429, headers={"Retry-After": "3"}, match="/manifests/")
    async with http.get(f"{one}/v2/{image.name}/manifests/v1",
                        headers={"Accept": image.media_type}) as resp:
        assert resp.status == 429
    upstream.proxy.clear_faults()
    asked = len(upstream.proxy.records)
    started = time.monotonic()
    pulled = asyncio.ensure_future(pull(http, two, image.name, "v1"))
    await asyncio.sleep(2.0)
    assert len(upstream.proxy.records) == asked, "replica two asked during the pause"
    assert (await pulled).digest == image.digest  # once the pause ran out
    assert time.monotonic() - started >= 2.5


async def test_a_range_and_a_late_joiner_on_a_follower_while_the_holder_fetches(
        cluster_factory, upstream, http):
    cluster = cluster_factory(count=2)
    one, two = cluster.urls
    image = upstream.push_image("team/late", "v1", "late", size=6 * MiB)
    for base in cluster.urls:
        await pull_manifest(http, base, image)
    layer = image.layer_digests[0]
    data = image.blobs[layer]
    upstream.reset()
    upstream.proxy.throttle(4 * MiB, match=layer)
    first = asyncio.ensure_future(get_blob(http, one, image.name, layer))
    assert await wait_until(lambda: holder_of(cluster, layer) == "r1", timeout=10)
    await asyncio.sleep(0.5)
    async with http.get(f"{two}/v2/{image.name}/blobs/{layer}",
                        headers={"Range": "bytes=100-199"}) as resp:
        assert resp.status == 206
        assert await resp.read() == data[100:200]
    async with http.get(f"{two}/v2/{image.name}/blobs/{layer}",  # a client's resume
                        headers={"Range": f"bytes={len(data) - 1000}-"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == \
            f"bytes {len(data) - 1000}-{len(data) - 1}/{len(data)}"
        assert await resp.read() == data[-1000:]
    late = await get_blob(http, two, image.name, layer)
    assert late == data and await first == data
    assert fetched(upstream, "GET", layer) == 1
