"""The metadata contract: SQLite (one node) and Redis (a cluster's shared store) answer every
Metadata call alike — manifests, tag records, tag lists, the catalog, hosted repositories,
the usage ledger and each rule of eviction. Then what only Redis has: replicas that see
each other's writes at once, a Redis that lost its data is told from one that is down, and
an outage fails every call as a typed 503 while the ledger writes wait for Redis to return."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from mirror.errors import ManifestBlobUnknown
from mirror.storage.metadata import ManifestPush, Metadata, TagRecord
from mirror.storage.redis_metadata import MetadataLost, MetadataUnavailable, RedisMetadata
from mirror.storage.sqlite import SqliteMetadata
from tests.support.registry import free_port

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LATER = 2e9  # a cutoff after every clock a test sets: nothing is "used since"


def d(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def absent(digest: str) -> None:
    return None


def never(digest: str) -> bool:
    return False


@dataclass
class Backend:
    """The store under test, and a way to open a second handle on the same data (another
    process on the SQLite file, another replica on the Redis prefix)."""

    kind: str
    opener: Callable[[], Awaitable[Metadata]]
    opened: list[Metadata] = field(default_factory=list)

    async def open(self) -> Metadata:
        metadata = await self.opener()
        self.opened.append(metadata)
        return metadata


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request, tmp_path):
    if request.param == "sqlite":
        async def opener() -> Metadata:
            return SqliteMetadata(tmp_path)
    else:
        url, prefix = request.getfixturevalue("redis_url_prefix")

        async def opener() -> Metadata:
            return await RedisMetadata.connect(url, prefix)
    backend = Backend(request.param, opener)
    yield backend
    for metadata in backend.opened:
        await metadata.close()


@pytest.fixture
async def metadata(backend) -> Metadata:
    return await backend.open()


async def blob(metadata: Metadata, name: str, size: int = 10, atime: float = 100.0) -> str:
    digest = d(name)
    metadata.record_blob(digest, size, atime=atime)
    await metadata.flush()
    return digest


def push(name: str, manifest: bytes, blobs: dict[str, int], tags=("v1",), **extra) -> ManifestPush:
    return ManifestPush(name=name, digest=d(manifest.decode()), media_type=OCI_MANIFEST,
                        body=manifest, refs=list(blobs), blobs=blobs, tags=list(tags), **extra)


# Manifests, tag records, tag lists, the catalog.

async def test_a_manifest_is_stored_once_and_entered_in_the_ledger_with_its_refs(metadata):
    layer, config = d("layer"), d("config")
    await metadata.put_manifest(d("m"), OCI_MANIFEST, b"manifest body", [layer, config])
    await metadata.put_manifest(d("m"), "other/type", b"manifest body", [layer])
    assert await metadata.manifest(d("m")) == (OCI_MANIFEST, b"manifest body")
    assert await metadata.manifest(d("unknown")) is None
    assert await metadata.manifest_digests() == [d("m")]
    item = await metadata.item(d("m"))
    assert (item.kind, item.size, item.pinned) == ("manifest", 13, False)
    assert abs(item.atime - time.time()) < 5
    assert sorted(await metadata.children(d("m"))) == sorted([layer, config])
    assert await metadata.parents(layer) == [d("m")]
    assert metadata.total() == 13 and await metadata.refresh_total() == 13


async def test_tag_records_are_kept_per_accept_class_and_found_by_digest(metadata):
    first = TagRecord(d("a"), OCI_INDEX, 120, 1000.5)
    await metadata.put_tag("localhost:5000/team/app", "v1", "index", first)
    await metadata.put_tag("docker.io/library/alpine", "3.19", "manifest",
                           TagRecord(d("b"), OCI_MANIFEST, 80, 2000.0))
    assert await metadata.tag("localhost:5000/team/app", "v1", "index") == first
    assert await metadata.tag("localhost:5000/team/app", "v1", "manifest") is None
    assert await metadata.tags_of(d("a")) == [("localhost:5000/team/app", "v1", "index")]
    # The tag moves: the old digest no longer counts it.
    moved = TagRecord(d("b"), OCI_MANIFEST, 80, 3000.0)
    await metadata.put_tag("localhost:5000/team/app", "v1", "index", moved)
    assert await metadata.tags_of(d("a")) == []
    assert await metadata.tags_of(d("b")) == [("docker.io/library/alpine", "3.19", "manifest"),
                                              ("localhost:5000/team/app", "v1", "index")]
    assert await metadata.tag_records() == [
        ("docker.io/library/alpine", "3.19", "manifest",
         TagRecord(d("b"), OCI_MANIFEST, 80, 2000.0)),
        ("localhost:5000/team/app", "v1", "index", moved)]
    await metadata.drop_tag("localhost:5000/team/app", "v1", "index")
    await metadata.drop_tag("localhost:5000/team/app", "never", "index")  # no such record
    assert await metadata.tag("localhost:5000/team/app", "v1", "index") is None
    assert await metadata.tags_of(d("b")) == [("docker.io/library/alpine", "3.19", "manifest")]
    assert [r[:3] for r in await metadata.tag_records()] == [
        ("docker.io/library/alpine", "3.19", "manifest")]


async def test_tag_lists_and_the_catalog(metadata):
    assert await metadata.tag_list("docker.io/library/alpine") is None
    await metadata.put_tag_list("docker.io/library/alpine", ["3.19", "latest"])
    tags, fetched_at = await metadata.tag_list("docker.io/library/alpine")
    assert tags == ["3.19", "latest"] and abs(fetched_at - time.time()) < 5
    for name in ("library/alpine", "hub/team/app", "library/alpine"):
        await metadata.add_repository(name)
    assert await metadata.repository_names() == ["hub/team/app", "library/alpine"]
    assert await metadata.has_repository("library/alpine")
    assert not await metadata.has_repository("library/busybox")


# Hosted repositories.

async def test_a_pushed_manifest_links_its_blobs_tags_and_referrer_entry(metadata):
    layer, config = await blob(metadata, "layer", 30), await blob(metadata, "config", 2)
    image = push("team/app", b'{"image": 1}', {layer: 30, config: 2}, tags=("v1", "latest"))
    await metadata.push_manifest(image, lambda digest: {layer: 30, config: 2}.get(digest))
    descriptor = {"mediaType": OCI_MANIFEST, "digest": d("sig"), "size": 9,
                  "artifactType": "application/example"}
    signature = ManifestPush("team/app", d("sig"), OCI_MANIFEST, b'{"sig": 1}', [], {}, [],
                             subject=image.digest, descriptor=descriptor)
    await metadata.push_manifest(signature, absent)

    repo = await metadata.hosted("team/app")
    assert repo.name == "team/app"
    assert repo.tags == {"v1": image.digest, "latest": image.digest}
    assert repo.manifests == {image.digest: OCI_MANIFEST, d("sig"): OCI_MANIFEST}
    assert repo.blobs == {layer: 30, config: 2}
    assert await metadata.hosted("team/none") is None
    assert await metadata.hosted_names() == ["team/app"]
    assert await metadata.is_hosted("team/app") and not await metadata.is_hosted("team/none")
    assert await metadata.hosted_blob("team/app", layer) == 30
    assert await metadata.hosted_blob("team/app", d("other")) is None
    assert await metadata.hosted_manifest("team/app", "v1") == image.digest
    assert await metadata.hosted_manifest("team/app", image.digest) == image.digest
    assert await metadata.hosted_manifest("team/app", "v2") is None
    assert await metadata.hosted_manifest("team/app", d("unpushed")) is None
    assert await metadata.referrers("team/app", image.digest) == [descriptor]
    assert await metadata.referrers("team/app", d("other")) == []
    assert await metadata.manifest(image.digest) == (OCI_MANIFEST, b'{"image": 1}')
    assert (await metadata.item(image.digest)).kind == "manifest"
    assert sorted(await metadata.children(image.digest)) == sorted([layer, config])
    assert await metadata.held_by_hosted() == {layer, config, image.digest, d("sig")}


async def test_a_push_naming_a_missing_blob_is_refused_and_stores_nothing(metadata):
    layer = await blob(metadata, "layer", 30)
    image = push("team/app", b'{"image": 2}', {layer: 30, d("missing"): 5})
    with pytest.raises(ManifestBlobUnknown) as raised:
        await metadata.push_manifest(image, lambda digest: 30 if digest == layer else None)
    assert d("missing") in raised.value.message
    assert await metadata.hosted("team/app") is None
    assert await metadata.hosted_names() == []
    assert not await metadata.is_hosted("team/app")
    assert await metadata.manifest(image.digest) is None
    assert await metadata.item(image.digest) is None
    assert await metadata.parents(layer) == []
    assert await metadata.held_by_hosted() == set()


async def test_a_blob_is_linked_only_when_it_is_stored(metadata):
    assert await metadata.link_blob("team/app", d("nowhere"), absent) is None
    assert await metadata.hosted("team/app") is None  # a failed mount creates nothing
    layer = await blob(metadata, "layer", 30)
    assert await metadata.link_blob("team/app", layer, lambda digest: 30) == 30
    assert (await metadata.hosted("team/app")).blobs == {layer: 30}
    assert await metadata.held_by_hosted() == {layer}


async def test_deleting_a_hosted_tag_manifest_and_blob(metadata):
    layer = await blob(metadata, "layer", 30)
    image = push("team/app", b'{"image": 3}', {layer: 30}, tags=("v1", "v2"))
    await metadata.push_manifest(image, lambda digest: 30)
    sig = ManifestPush("team/app", d("sig"), OCI_MANIFEST, b"{}", [], {}, [],
                       subject=image.digest, descriptor={"digest": d("sig")})
    await metadata.push_manifest(sig, absent)
    total = metadata.total()
    assert await metadata.delete_hosted_tag("team/app", "v2")
    assert not await metadata.delete_hosted_tag("team/app", "v2")
    assert (await metadata.hosted("team/app")).tags == {"v1": image.digest}

    assert await metadata.delete_hosted_manifest("team/app", d("sig"))
    assert await metadata.referrers("team/app", image.digest) == []
    assert await metadata.item(d("sig")) is None  # nothing else wanted it
    assert await metadata.manifest(d("sig")) is None
    assert metadata.total() == total - 2

    assert await metadata.delete_hosted_manifest("team/app", image.digest)
    assert not await metadata.delete_hosted_manifest("team/app", image.digest)
    repo = await metadata.hosted("team/app")
    assert repo.tags == {} and repo.manifests == {}  # its tags went with it
    assert await metadata.item(image.digest) is None
    assert await metadata.parents(layer) == []  # so its layer is free to go
    assert await metadata.delete_hosted_blob("team/app", layer)
    assert not await metadata.delete_hosted_blob("team/app", layer)
    assert (await metadata.hosted("team/app")).blobs == {}
    assert await metadata.held_by_hosted() == set()
    assert (await metadata.item(layer)).size == 30  # the ledger keeps the stored blob


async def test_a_deleted_hosted_manifest_stays_while_something_else_wants_it(metadata):
    layer = await blob(metadata, "layer", 30)
    for name in ("team/one", "team/two"):
        await metadata.push_manifest(push(name, b'{"image": 4}', {layer: 30}), lambda _: 30)
    digest = d('{"image": 4}')
    assert await metadata.delete_hosted_manifest("team/one", digest)
    assert (await metadata.item(digest)).kind == "manifest"  # team/two holds it
    await metadata.put_tag("docker.io/x", "t", "manifest", TagRecord(digest, OCI_MANIFEST, 12, 0))
    assert await metadata.delete_hosted_manifest("team/two", digest)
    assert (await metadata.item(digest)).kind == "manifest"  # a cached tag points at it
    assert await metadata.held_by_hosted() == {layer}


# The usage ledger.

async def test_a_recorded_blob_is_seen_by_a_second_handle_after_flush(backend, metadata):
    metadata.record_blob(d("layer"), 30, atime=100.0)
    metadata.record_blob(d("layer"), 30, atime=50.0)  # an older clock does not win
    metadata.record_blob(d("other"), 7)
    await metadata.flush()
    # Any later call on the same handle follows its queued writes. (SQLite's flush alone
    # does not wait for them when no clock is pending; Redis's does, see below.)
    assert len(await metadata.items()) == 2
    other = await backend.open()
    layer = await other.item(d("layer"))
    assert (layer.kind, layer.size, layer.atime, layer.pinned) == ("blob", 30, 100.0, False)
    assert abs((await other.item(d("other"))).atime - time.time()) < 5
    assert {item.digest for item in await other.items()} == {d("layer"), d("other")}
    assert await other.refresh_total() == 37 and metadata.total() == 37
    metadata.record_blob(d("layer"), 30, atime=150.0)  # entered once, its clock raised
    assert (await metadata.item(d("layer"))).atime == 150.0
    assert await metadata.refresh_total() == 37


async def test_a_hit_moves_the_clock_in_memory_and_flush_writes_it(backend, metadata):
    layer = await blob(metadata, "layer", 30, atime=100.0)
    other = await backend.open()
    metadata.touch(layer)
    assert abs((await metadata.item(layer)).atime - time.time()) < 5  # this handle knows
    assert (await other.item(layer)).atime == 100.0  # not written yet
    assert [i.atime for i in await metadata.oldest(LATER)] == [100.0]  # the index neither
    await metadata.flush()
    assert abs((await other.item(layer)).atime - time.time()) < 5
    metadata.touch(d("never recorded"))  # a clock for no item enters nothing
    await metadata.flush()
    assert await other.item(d("never recorded")) is None


async def test_oldest_pages_the_ledger_by_clock_then_digest(metadata):
    ties = sorted(d(f"tie{i}") for i in range(3))
    for digest in ties:
        metadata.record_blob(digest, 1, atime=10.0)
    metadata.record_blob(d("x"), 1, atime=20.0)
    metadata.record_blob(d("y"), 1, atime=30.0)
    await metadata.flush()
    page = await metadata.oldest(25.0, limit=2)
    assert [(i.atime, i.digest) for i in page] == [(10.0, ties[0]), (10.0, ties[1])]
    page = await metadata.oldest(25.0, (page[-1].atime, page[-1].digest), limit=2)
    assert [(i.atime, i.digest) for i in page] == [(10.0, ties[2]), (20.0, d("x"))]
    assert await metadata.oldest(25.0, (20.0, d("x"))) == []  # y is not before 25
    assert await metadata.oldest(10.0) == []  # strictly before
    assert [i.digest for i in await metadata.oldest(LATER, (10.0, ties[1]))] == [
        ties[2], d("x"), d("y")]
    assert (page[0].kind, page[0].size, page[0].pinned) == ("blob", 1, False)


async def test_a_pin_keeps_what_it_reaches(metadata):
    layer, config = await blob(metadata, "layer"), await blob(metadata, "config")
    await metadata.put_manifest(d("manifest"), OCI_MANIFEST, b"m", [layer, config])
    await metadata.put_manifest(d("index"), OCI_INDEX, b"i", [d("manifest")])
    assert not await metadata.pin(d("nothing"))
    assert await metadata.pinned_closure() == set()
    assert await metadata.pin(d("index"))
    assert (await metadata.item(d("index"))).pinned
    assert await metadata.pinned_closure() == {d("index"), d("manifest"), layer, config}
    assert await metadata.pin(d("index"), False)
    assert not (await metadata.item(d("index"))).pinned
    assert await metadata.pinned_closure() == set()


async def test_forget_takes_a_manifest_with_its_tag_records(metadata):
    layer = await blob(metadata, "layer", 30)
    await metadata.put_manifest(d("m"), OCI_MANIFEST, b"12345", [layer])
    await metadata.put_tag("docker.io/x", "v1", "index", TagRecord(d("m"), OCI_MANIFEST, 5, 0))
    assert metadata.total() == 35
    await metadata.forget(d("m"))
    assert await metadata.item(d("m")) is None
    assert await metadata.manifest(d("m")) is None
    assert await metadata.manifest_digests() == []
    assert await metadata.tag("docker.io/x", "v1", "index") is None
    assert await metadata.tags_of(d("m")) == []
    assert await metadata.parents(layer) == []
    assert metadata.total() == 30 and await metadata.refresh_total() == 30
    await metadata.forget(layer)
    await metadata.forget(d("never there"))
    assert await metadata.items() == [] and await metadata.refresh_total() == 0


# Eviction: each rule that keeps an item, and one that goes.

async def test_eviction_keeps_a_pinned_item(metadata):
    layer = await blob(metadata, "layer")
    await metadata.pin(layer)
    assert await metadata.evict(layer, LATER, never, pytest.fail) is None
    assert await metadata.item(layer) is not None


async def test_eviction_keeps_an_item_used_since_the_cutoff(metadata):
    layer = await blob(metadata, "layer", atime=100.0)
    assert await metadata.evict(layer, 100.0, never, pytest.fail) is None  # used at cutoff
    metadata.touch(layer)  # a hit not yet flushed counts too
    assert await metadata.evict(layer, 1000.0, never, pytest.fail) is None
    assert await metadata.item(layer) is not None


async def test_eviction_keeps_an_item_in_use(metadata):
    layer = await blob(metadata, "layer")
    asked = []
    assert await metadata.evict(layer, LATER, lambda digest: asked.append(digest) or True,
                                pytest.fail) is None
    assert asked == [layer] and await metadata.item(layer) is not None


async def test_eviction_keeps_a_blob_a_kept_manifest_refers_to(metadata):
    layer = await blob(metadata, "layer")
    await metadata.put_manifest(d("m"), OCI_MANIFEST, b"m", [layer])
    assert await metadata.evict(layer, LATER, never, pytest.fail) is None
    assert await metadata.item(layer) is not None


async def test_eviction_keeps_a_hosted_manifest(metadata):
    layer = await blob(metadata, "layer")
    image = push("team/app", b'{"image": 5}', {layer: 10})
    await metadata.push_manifest(image, lambda _: 10)
    assert await metadata.evict(image.digest, LATER, never, pytest.fail) is None
    assert (await metadata.item(image.digest)).kind == "manifest"


async def test_eviction_keeps_a_blob_linked_within_the_grace(metadata):
    layer = await blob(metadata, "layer")
    await metadata.link_blob("team/app", layer, lambda _: 10)
    assert await metadata.evict(layer, LATER, never, pytest.fail,
                                linked_before=time.time() - 60) is None
    assert await metadata.hosted_blob("team/app", layer) == 10


async def test_an_evicted_blob_goes_with_its_file_and_its_old_links(metadata):
    layer = await blob(metadata, "layer", 30)
    kept = await blob(metadata, "kept", 5)
    await metadata.link_blob("team/app", layer, lambda _: 30)  # a push that never finished
    removed = []
    evicted = await metadata.evict(layer, LATER, never, removed.append,
                                   linked_before=time.time() + 60)
    assert removed == [layer]
    assert (evicted.item.digest, evicted.item.kind, evicted.item.size) == (layer, "blob", 30)
    assert evicted.children == [] and evicted.tags == []
    assert await metadata.item(layer) is None
    assert await metadata.hosted_blob("team/app", layer) is None
    assert [i.digest for i in await metadata.oldest(LATER)] == [kept]
    assert metadata.total() == 5 and await metadata.refresh_total() == 5
    assert await metadata.evict(layer, LATER, never, removed.append) is None  # gone already
    assert removed == [layer]


async def test_an_evicted_manifest_goes_with_its_tags_and_frees_its_children(metadata):
    layer = await blob(metadata, "layer", 30)
    await metadata.put_manifest(d("m"), OCI_MANIFEST, b"12345", [layer])
    await metadata.put_tag("docker.io/x", "v1", "index", TagRecord(d("m"), OCI_MANIFEST, 5, 0))
    await metadata.put_tag("docker.io/x", "v1", "manifest",
                           TagRecord(d("m"), OCI_MANIFEST, 5, 0))
    evicted = await metadata.evict(d("m"), LATER, never, pytest.fail)  # no file: no removal
    assert (evicted.item.kind, evicted.item.size) == ("manifest", 5)
    assert evicted.children == [layer]
    assert sorted(evicted.tags) == [("docker.io/x", "v1", "index"),
                                    ("docker.io/x", "v1", "manifest")]
    assert await metadata.manifest(d("m")) is None
    assert await metadata.tag_records() == []
    removed = []
    assert (await metadata.evict(layer, LATER, never, removed.append)).item.digest == layer
    assert removed == [layer] and await metadata.refresh_total() == 0


# Redis only: a store shared by replicas.

@pytest.fixture
async def replicas(redis_url_prefix):
    url, prefix = redis_url_prefix
    first = await RedisMetadata.connect(url, prefix)
    second = await RedisMetadata.connect(url, prefix)
    yield first, second
    await first.close()
    await second.close()


async def test_replicas_see_each_others_writes_at_once(replicas):
    first, second = replicas
    await first.put_tag("docker.io/x", "v1", "index", TagRecord(d("m"), OCI_INDEX, 3, 1.0))
    assert (await second.tag("docker.io/x", "v1", "index")).digest == d("m")
    await second.put_manifest(d("m"), OCI_INDEX, b"abc", [])
    assert await first.manifest(d("m")) == (OCI_INDEX, b"abc")
    first.record_blob(d("layer"), 30)
    await first.item(d("layer"))  # any later call on `first` follows the queued write
    assert (await second.item(d("layer"))).size == 30
    first.record_blob(d("config"), 2)
    await first.flush()  # and flush waits for it
    assert (await second.item(d("config"))).size == 2
    assert await second.refresh_total() == 35 and first.total() == 35


async def test_a_blob_in_the_shared_ledger_counts_as_stored_without_a_local_file(replicas):
    first, second = replicas
    first.record_blob(d("layer"), 30)
    await first.flush()
    # `second` runs on another node: its disk does not have the blob, the cluster does.
    assert await second.link_blob("team/mount", d("layer"), absent) == 30
    await second.push_manifest(push("team/app", b'{"image": 6}', {d("layer"): 30}), absent)
    assert (await first.hosted("team/app")).blobs == {d("layer"): 30}


async def test_an_async_remove_file_is_awaited_and_a_mount_meanwhile_is_refused(replicas):
    first, _ = replicas
    layer = await blob(first, "layer", 30)
    removed, mounted = [], []

    async def remove(digest: str) -> None:  # an S3 delete: the ledger entry is gone already
        mounted.append(await first.link_blob("team/app", digest, lambda _: 30))
        await asyncio.sleep(0.01)
        removed.append(digest)

    evicted = await first.evict(layer, LATER, never, remove)
    assert evicted.item.digest == layer and removed == [layer]
    assert mounted == [None]  # the file was still on disk, but on its way out
    assert await first.hosted("team/app") is None


async def test_a_mount_landing_while_eviction_decides_keeps_the_blob(replicas,
                                                                     redis_url_prefix):
    first, _ = replicas
    layer = await blob(first, "layer", 30)
    url, prefix = redis_url_prefix

    async def mount_on_another_replica() -> int | None:
        other = await RedisMetadata.connect(url, prefix)
        try:
            return await other.link_blob("team/app", layer, absent)
        finally:
            await other.close()

    def in_use(digest: str) -> bool:
        # Between eviction's reads and its EXEC another replica links the blob.
        if not linked:
            thread = threading.Thread(target=lambda: linked.append(
                asyncio.run(mount_on_another_replica())))
            thread.start()
            thread.join()
        return False

    linked: list[Any] = []
    assert await first.evict(layer, LATER, in_use, pytest.fail,
                             linked_before=time.time() - 60) is None
    assert linked == [30]
    assert (await first.item(layer)).size == 30
    assert await first.hosted_blob("team/app", layer) == 30


async def test_a_redis_restarted_without_persistence_is_reported_as_lost(start_redis):
    server = start_redis()  # no persistence: the default of a Redis without configuration
    metadata = await RedisMetadata.connect(server.url)
    await metadata.put_tag("docker.io/x", "v1", "index", TagRecord(d("m"), OCI_INDEX, 3, 1))
    await metadata.check()
    server.stop()
    server.start()
    with pytest.raises(MetadataLost) as raised:
        await metadata.check()
    assert "appendonly" in raised.value.message and "persistence" in raised.value.message
    assert server.url in raised.value.message and raised.value.status == 503
    assert await metadata.tag("docker.io/x", "v1", "index") is None  # it really is gone
    fresh = await RedisMetadata.connect(server.url)  # a replica started after the loss
    await fresh.check()
    with pytest.raises(MetadataLost):  # the old one still knows better
        await metadata.check()
    await fresh.close()
    await metadata.close()


def every_call(metadata: RedisMetadata) -> dict[str, Callable[[], Awaitable[Any]]]:
    record = TagRecord(d("m"), OCI_INDEX, 3, 1.0)
    image = push("team/app", b"{}", {})
    return {
        "manifest": lambda: metadata.manifest(d("m")),
        "put_manifest": lambda: metadata.put_manifest(d("m"), OCI_INDEX, b"{}", []),
        "manifest_digests": metadata.manifest_digests,
        "tag": lambda: metadata.tag("docker.io/x", "v1", "index"),
        "put_tag": lambda: metadata.put_tag("docker.io/x", "v1", "index", record),
        "drop_tag": lambda: metadata.drop_tag("docker.io/x", "v1", "index"),
        "tag_records": metadata.tag_records,
        "tags_of": lambda: metadata.tags_of(d("m")),
        "tag_list": lambda: metadata.tag_list("docker.io/x"),
        "put_tag_list": lambda: metadata.put_tag_list("docker.io/x", ["v1"]),
        "add_repository": lambda: metadata.add_repository("x"),
        "repository_names": metadata.repository_names,
        "has_repository": lambda: metadata.has_repository("x"),
        "hosted_names": metadata.hosted_names,
        "is_hosted": lambda: metadata.is_hosted("team/app"),
        "hosted": lambda: metadata.hosted("team/app"),
        "hosted_blob": lambda: metadata.hosted_blob("team/app", d("layer")),
        "hosted_manifest": lambda: metadata.hosted_manifest("team/app", "v1"),
        "link_blob": lambda: metadata.link_blob("team/app", d("layer"), lambda _: 30),
        "push_manifest": lambda: metadata.push_manifest(image, absent),
        "delete_hosted_tag": lambda: metadata.delete_hosted_tag("team/app", "v1"),
        "delete_hosted_manifest": lambda: metadata.delete_hosted_manifest("team/app", d("m")),
        "delete_hosted_blob": lambda: metadata.delete_hosted_blob("team/app", d("layer")),
        "referrers": lambda: metadata.referrers("team/app", d("m")),
        "held_by_hosted": metadata.held_by_hosted,
        "flush": metadata.flush,
        "item": lambda: metadata.item(d("layer")),
        "items": metadata.items,
        "oldest": lambda: metadata.oldest(LATER),
        "parents": lambda: metadata.parents(d("layer")),
        "children": lambda: metadata.children(d("m")),
        "pin": lambda: metadata.pin(d("layer")),
        "pinned_closure": metadata.pinned_closure,
        "forget": lambda: metadata.forget(d("layer")),
        "evict": lambda: metadata.evict(d("layer"), LATER, never, pytest.fail),
        "refresh_total": metadata.refresh_total,
        "check": metadata.check,
        "catalog_page": lambda: metadata.catalog_page("", 10),
        "hosted_page": lambda: metadata.hosted_page("", 10),
        "hosted_tags_page": lambda: metadata.hosted_tags_page("team/app", "", 10),
        "tagged_page": lambda: metadata.tagged_page("docker.io/", "", 10),
        "repository_tags": lambda: metadata.repository_tags(["docker.io/library/alpine"]),
        "ledger_entries": lambda: metadata.ledger_entries([d("layer")]),
        "manifests_of": lambda: metadata.manifests_of([d("m")]),
    }


async def test_with_redis_down_every_call_is_a_503_and_recorded_blobs_wait(start_redis, caplog):
    caplog.set_level(logging.INFO, "mirror")
    server = start_redis(appendonly=True)
    metadata = await RedisMetadata.connect(server.url, "outage:")
    await blob(metadata, "before", 5)
    calls = every_call(metadata)
    interface = {name for name, method in vars(Metadata).items()
                 if inspect.iscoroutinefunction(method) and name != "close"}
    assert set(calls) == interface  # every async method of the interface is tried
    server.stop()
    metadata.touch(d("before"))  # a hit does not raise, and its clock waits
    with pytest.raises(MetadataUnavailable):
        await metadata.flush()
    metadata.record_blob(d("during"), 30)  # a commit does not fail either
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(MetadataUnavailable) as raised:
            await asyncio.wait_for(call(), 10)
        assert time.monotonic() - started < 5, name
        error = raised.value
        assert (error.status, error.code, error.headers) == (
            503, "UNAVAILABLE", {"Retry-After": "5"}), name
        assert f"Redis at {server.url}" in error.message, name
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not per call

    server.start()  # the same port; appendonly kept everything written before
    await metadata.flush()
    other = await RedisMetadata.connect(server.url, "outage:")
    assert (await other.item(d("during"))).size == 30
    assert abs((await other.item(d("before"))).atime - time.time()) < 30
    assert await other.refresh_total() == 35
    await metadata.check()  # the data survived: not "lost"
    await other.close()
    await metadata.close()


async def test_an_unreachable_redis_is_named_without_its_password():
    port = free_port()  # nobody listens there
    with pytest.raises(MetadataUnavailable) as raised:
        await RedisMetadata.connect(f"redis://:hunter2@127.0.0.1:{port}/0")
    assert "hunter2" not in raised.value.message
    assert f"Redis at redis://127.0.0.1:{port}/0) is unreachable" in raised.value.message
