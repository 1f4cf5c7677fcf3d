"""Several `mirror serve` replicas on one Redis and one SeaweedFS bucket, for the cluster
tests: `Cluster` (N MirrorProcess sharing a bucket and a Redis key space), the
`cluster_factory` fixture (load with pytest_plugins, as tests/conftest.py does), a
round-robin client that sends every request to the next replica, and a push spread over
replicas as such a load balancer spreads it."""

from __future__ import annotations

import itertools
import uuid

import aiohttp
import pytest

from .process import MirrorProcess, sha256, with_digest
from .seaweed import SeaweedFS

MiB = 1 << 20
SECRET = "test-cluster-secret-0123456789"


class Cluster:
    """N `mirror serve` processes sharing a bucket and a Redis key space."""

    def __init__(self, tmp_path, upstream_url: str, redis_url: str, seaweed: SeaweedFS,
                 bucket: str, count: int = 3, local_tier: bool = True, **settings):
        self.name = "c" + uuid.uuid4().hex[:10]
        self.bucket = bucket
        self.seaweed = seaweed
        self.replicas = []
        for i in range(count):
            layers = {
                "storage": {"backend": "s3", **({"local_cache_size": 64 * MiB}
                                                if local_tier else {})},
                "storage.s3": {"endpoint": seaweed.endpoint, "bucket": bucket,
                               "access_key": seaweed.access_key,
                               "secret_key": seaweed.secret_key},
                "cluster": {"redis": redis_url, "name": self.name, "replica": f"r{i + 1}",
                            "secret": SECRET},
            }
            for section, values in settings.items():
                layers.setdefault(section, {}).update(values)
            self.replicas.append(MirrorProcess(tmp_path / f"r{i + 1}" / "data",
                                               tmp_path / f"r{i + 1}", upstream_url,
                                               settings=layers, tag_ttl=3600.0))

    def start(self) -> "Cluster":
        for replica in self.replicas:
            replica.start(timeout=30)
        return self

    def kill(self) -> None:
        for replica in self.replicas:
            replica.kill()

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def objects(self, prefix: str = "") -> dict[str, int]:
        """What the bucket holds under `prefix`: key -> size, read with botocore directly."""
        found, token = {}, None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = s3_client(self.seaweed).list_objects_v2(**kwargs)
            found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
            token = page.get("NextContinuationToken")
            if not token:
                return found

    def multipart_uploads(self) -> list[str]:
        page = s3_client(self.seaweed).list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in page.get("Uploads", [])]


def s3_client(seaweed: SeaweedFS):
    """A plain (blocking) botocore client on the test's SeaweedFS, to look at the bucket."""
    import botocore.session
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "s3", endpoint_url=seaweed.endpoint, region_name="us-east-1",
        aws_access_key_id=seaweed.access_key, aws_secret_access_key=seaweed.secret_key,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


@pytest.fixture
def cluster_factory(tmp_path, upstream, redis_server, seaweed):
    made = []

    def make(count: int = 3, redis_url: str | None = None, store: SeaweedFS | None = None,
             local_tier: bool = True, **settings) -> Cluster:
        store = store or seaweed
        bucket = "b" + uuid.uuid4().hex[:12]
        store.create_bucket(bucket)
        cluster = Cluster(tmp_path / bucket, upstream.url, redis_url or redis_server.url, store,
                          bucket, count, local_tier, **settings)
        made.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        for cluster in made:
            cluster.kill()


class RoundRobin:
    """Every request to the next replica, as a load balancer without affinity sends it."""

    def __init__(self, session: aiohttp.ClientSession, urls: list[str]):
        self.session = session
        self._next = itertools.cycle(urls)
        self.used: list[str] = []

    def base(self) -> str:
        url = next(self._next)
        self.used.append(url)
        return url

    def path(self, location: str) -> str:
        """A Location (relative, or absolute on whichever replica answered) on the next."""
        if location.startswith("http"):
            location = "/" + location.split("://", 1)[1].partition("/")[2]
        return self.base() + location


async def push_spread(lb: RoundRobin, image, chunk: int) -> None:
    """POST, each PATCH, PUT and the manifest PUT, each on the next replica."""
    http = lb.session
    for data in image.blobs.values():
        digest = sha256(data)
        async with http.post(f"{lb.base()}/v2/{image.name}/blobs/uploads/") as resp:
            assert resp.status == 202, await resp.text()
            location = resp.headers["Location"]
        for start in range(0, len(data), chunk):
            piece = data[start:start + chunk]
            async with http.patch(lb.path(location), data=piece, headers={
                    "Content-Range": f"{start}-{start + len(piece) - 1}",
                    "Content-Type": "application/octet-stream"}) as resp:
                assert resp.status == 202, await resp.text()
                location = resp.headers["Location"]
                assert resp.headers["Range"] == f"0-{start + len(piece) - 1}"
        async with http.put(with_digest(lb.path(location), digest)) as resp:
            assert resp.status == 201, await resp.text()
    for tag in image.tags:
        async with http.put(f"{lb.base()}/v2/{image.name}/manifests/{tag}", data=image.manifest,
                            headers={"Content-Type": image.media_type}) as resp:
            assert resp.status == 201, await resp.text()
