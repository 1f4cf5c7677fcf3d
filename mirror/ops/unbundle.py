"""`mirror import`: load an OCI image layout tar (bundle.py) into this mirror's cache.

The tar is read as a stream, once, in any member order: every blob is hashed while it is
copied into a spool file (BlobStore.spool), so no blob is ever held in memory whole, and a
member whose bytes do not match the digest it is named by stops the import. Only when the
whole bundle has checked out is anything stored, in the order that keeps the cache
consistent for a server reading it meanwhile: blobs (committed from their spools), then
manifests, then tag records (both Accept classes for a single-platform manifest, "index"
for an index), the ledger and the catalog. So a corrupt or incomplete bundle stores
nothing. An image's name comes from its `org.opencontainers.image.ref.name` annotation,
a full reference (`docker.io/library/alpine:3.19`) whose first part names the upstream.
An image marked `mirror.hosted` (a pushed one) goes back into the hosted repository of its
name, as a push would put it there: the push-name rules (cache/names.py) are asked first,
and its manifests are stored through cache/hosted.py, children before their index, so the
repository links every blob and manifest it serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..cache import names
from ..cache.hosted import Hosted
from ..config import Config
from ..errors import RegistryError
from ..media import LIST_TYPES, OCI_MANIFEST
from ..reference import Route, Router, parse_digest
from ..storage.blobs import write_all
from ..storage.index import TagRecord
from .bundle import HOSTED, REF_NAME
from .local import (
    CommandError,
    Storage,
    human_size,
    image_blobs,
    parse_image,
    route_image,
)
from .progress import Progress, bar

READ_CHUNK = 1 << 20
# Manifests are read whole (they are small; registries refuse ones past 4 MiB).
MANIFEST_MAX = 4 << 20


class Received:
    """The verified blobs of the bundle: spooled when new, only hashed when already stored."""

    def __init__(self, storage: Storage, progress: Progress, total: int):
        self.store = storage.store
        self.progress, self.total, self.done = progress, total, 0
        self.spools: dict[str, tuple[Path, int]] = {}
        self.sizes: dict[str, int] = {}  # every digest the bundle carries

    def take(self, member: str, digest: str, source: BinaryIO, size: int) -> None:
        algorithm = digest.partition(":")[0]
        hasher = hashlib.new(algorithm)
        keep = self.store.size(digest) is None and digest not in self.spools
        fd, spool = self.store.spool() if keep else (-1, None)
        try:
            while chunk := source.read(READ_CHUNK):
                hasher.update(chunk)
                if spool is not None:
                    write_all(fd, chunk)
                self.done += len(chunk)
                self.progress.status(f"{bar(self.done, self.total)} {human_size(self.done)} / "
                                     f"{human_size(self.total)}  blobs {len(self.sizes)}")
            if spool is not None:
                os.fsync(fd)  # BlobStore.commit renames: the bytes must be on disk first
            computed = f"{algorithm}:{hasher.hexdigest()}"
            if computed != digest:
                raise CommandError(f"the bundle is corrupt: {member} should be {digest} but its "
                                   f"bytes are {computed}; nothing was imported")
        except BaseException:
            if spool is not None:
                spool.unlink(missing_ok=True)
            raise
        finally:
            if spool is not None:
                os.close(fd)
        if spool is not None:
            self.spools[digest] = (spool, size)
        self.sizes[digest] = size

    def body(self, digest: str) -> bytes | None:
        """A carried manifest's bytes, read back from its spool."""
        if digest not in self.spools:
            return None
        spool, size = self.spools[digest]
        if size > MANIFEST_MAX:
            raise CommandError(f"{digest} is named as a manifest but is {size} bytes")
        return spool.read_bytes()

    def discard(self) -> None:
        for spool, _ in self.spools.values():
            spool.unlink(missing_ok=True)
        self.spools.clear()


@dataclass
class Plan:
    """What the bundle adds: manifests (children before parents), blobs and tags."""
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    blobs: set[str] = field(default_factory=set)
    tags: list[tuple[Route, str, str]] = field(default_factory=list)  # route, tag, digest
    routes: list[Route] = field(default_factory=list)
    hosted: list[tuple[str, str, str]] = field(default_factory=list)  # name, reference, digest
    cached_digests: list[str] = field(default_factory=list)  # cached images named by digest
    missing_platforms: int = 0


def import_bundle(config: Config, path: str) -> int:
    return asyncio.run(_import(config, Path(path)))


async def _import(config: Config, path: Path) -> int:
    try:
        total = path.stat().st_size
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None
    started, progress = time.monotonic(), Progress()
    storage = Storage(config, create=True)
    received = Received(storage, progress, total)
    try:
        layout = _read(path, received)
        router = Router(config.upstreams)
        plan = await _plan(layout, received, storage, router, config)
        new = await _store(plan, received, storage)
        if plan.hosted:
            await _host(plan, storage, router, config)
    finally:
        received.discard()  # whatever was not committed
        progress.close()
        await storage.close()
    if plan.missing_platforms:
        print(f"note: {plan.missing_platforms} platform manifest(s) of the indexes are not in "
              "the bundle", flush=True)
    size = sum(received.sizes.values())
    images = len(plan.routes) + len(plan.hosted)
    print(f"imported {images} image(s) from {path}: {len(plan.manifests)} manifests, "
          f"{len(plan.blobs)} blobs ({new} new), {human_size(size)} ({size} bytes), in "
          f"{time.monotonic() - started:.1f}s", flush=True)
    for route, tag, digest in plan.tags:
        print(f"  {route.key}:{tag} {digest}")
    for name, reference, digest in plan.hosted:
        separator = "@" if ":" in reference else ":"
        print(f"  {name}{separator}{reference} {digest} (hosted)")
    return 0


def _read(path: Path, received: Received) -> dict:
    """Stream the tar once: verify and spool every blob; return the parsed index.json."""
    layout = None
    try:
        with tarfile.open(path, "r|*") as tar:  # "|": a stream, each member read once
            for member in tar:
                name = member.name.removeprefix("./")
                source = tar.extractfile(member) if member.isfile() else None
                if source is None:
                    continue
                if name == "index.json":
                    layout = _json(source.read(MANIFEST_MAX + 1), "index.json")
                elif name.startswith("blobs/"):
                    received.take(name, _digest(name), source, member.size)
    except (tarfile.TarError, EOFError) as e:
        raise CommandError(f"{path} is not a readable tar archive: {e}") from None
    if layout is None or not isinstance(layout.get("manifests"), list):
        raise CommandError(f"{path} is not an OCI image layout: it has no index.json "
                           "listing manifests")
    return layout


def _digest(name: str) -> str:
    parts = name.split("/")
    try:
        if len(parts) != 3:
            raise ValueError
        return parse_digest(f"{parts[1]}:{parts[2]}")
    except (ValueError, RegistryError):
        raise CommandError(f"the bundle holds {name}, which is not blobs/<algorithm>/<hex>") \
            from None


def _json(data: bytes, what: str) -> dict:
    try:
        document = json.loads(data)
    except ValueError:
        document = None
    if not isinstance(document, dict) or len(data) > MANIFEST_MAX:
        raise CommandError(f"{what} is not a JSON object of at most {MANIFEST_MAX} bytes")
    return document


async def _plan(layout: dict, received: Received, storage: Storage,
                router: Router, config: Config) -> Plan:
    plan = Plan()
    for entry in layout["manifests"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("digest"), str):
            raise CommandError("index.json lists a manifest without a digest")
        annotations = entry.get("annotations") or {}
        reference = annotations.get(REF_NAME)
        if annotations.get(HOSTED) == "true":
            await _plan_hosted(plan, received, storage, router, config, entry, reference)
            continue
        image = parse_image(reference) if isinstance(reference, str) else None
        if image is None or "/" not in image.name or \
                image.name.partition("/")[0] not in router.by_prefix:
            raise CommandError(
                f"{entry['digest']}: {REF_NAME} is {reference!r}, not a full reference whose "
                "first part names an upstream configured here (docker.io/library/alpine:3.19)")
        route = route_image(router, image)
        await _visit(plan, received, storage, entry["digest"], entry.get("mediaType"), reference,
               required=True)
        plan.routes.append(route)
        if image.by_digest:
            if image.reference != entry["digest"]:
                raise CommandError(f"{reference} is listed with digest {entry['digest']}")
            plan.cached_digests.append(image.reference)
        else:
            plan.tags.append((route, image.reference, entry["digest"]))
    return plan


async def _plan_hosted(plan: Plan, received: Received, storage: Storage, router: Router,
                       config: Config, entry: dict, reference: object) -> None:
    """A pushed image: its name must be one this mirror lets a client push to."""
    image = parse_image(reference) if isinstance(reference, str) else None
    if image is None or ":" in image.name.partition("/")[0]:
        raise CommandError(f"{entry['digest']}: {REF_NAME} is {reference!r}, not the name and "
                           "tag of a pushed image (team/app:1.0)")
    exists = await storage.metadata.hosted(image.name) is not None
    try:
        names.check_name(image.name, config.hosted, router, exists)
        if not exists:
            await names.check_not_cached(image.name, router, storage.index)
    except RegistryError as e:
        raise CommandError(f"{reference} cannot be hosted here: {e.message}") from None
    if image.by_digest and image.reference != entry["digest"]:
        raise CommandError(f"{reference} is listed with digest {entry['digest']}")
    before = plan.missing_platforms
    await _visit(plan, received, storage, entry["digest"], entry.get("mediaType"), reference,
                 required=True)
    if plan.missing_platforms != before:  # a push needs every child of an index first
        raise CommandError(f"{reference}: the bundle lacks manifests of this pushed index")
    plan.hosted.append((image.name, image.reference, entry["digest"]))


def _closure(plan: Plan, tops: list[str]) -> set[str]:
    """The manifests of the plan that `tops` are or list."""
    found: set[str] = set()
    while tops:
        digest = tops.pop()
        if digest in found or digest not in plan.manifests:
            continue
        found.add(digest)
        children = json.loads(plan.manifests[digest][1]).get("manifests")
        tops += [c["digest"] for c in children if isinstance(c, dict)
                 and isinstance(c.get("digest"), str)] if isinstance(children, list) else []
    return found


async def _host(plan: Plan, storage: Storage, router: Router, config: Config) -> None:
    """Store the pushed images as a push would: each manifest into its repository by
    digest, children before their index, then the tag. Every blob and manifest is in
    storage already (_store), so nothing here can miss one."""
    hosted = await Hosted.open(storage.index, storage.store, config.hosted, router)

    async def push(name: str, digest: str, reference: str) -> None:
        media_type, body = plan.manifests[digest]
        children = json.loads(body).get("manifests")
        for child in children if isinstance(children, list) else []:
            if isinstance(child, dict) and isinstance(child.get("digest"), str):
                await push(name, child["digest"], child["digest"])
        await hosted.put_manifest(name, reference, media_type, body, [])

    for name, reference, digest in plan.hosted:
        try:
            await push(name, digest, reference)
        except RegistryError as e:
            raise CommandError(f"{name}: {e.message}") from None


async def _visit(plan: Plan, received: Received, storage: Storage, digest: str,
           media_type: str | None, reference: str, required: bool) -> None:
    if digest in plan.manifests:
        return
    body = received.body(digest)
    if body is None:
        found = await storage.index.manifest(digest)  # carried already by an earlier import
        if found is None:
            if required:
                raise CommandError(f"{reference}: the bundle lacks its manifest {digest}")
            plan.missing_platforms += 1
            return
        media_type, body = found
    document = _json(body, f"the manifest {digest} of {reference}")
    media_type = media_type or document.get("mediaType") or OCI_MANIFEST
    children = document.get("manifests")
    if isinstance(children, list):
        for child in children:
            if isinstance(child, dict) and isinstance(child.get("digest"), str):
                await _visit(plan, received, storage, child["digest"], child.get("mediaType"),
                       reference, required=False)
    else:
        for blob, _ in image_blobs(document):
            if blob not in received.sizes and storage.store.size(blob) is None:
                raise CommandError(f"{reference}: the bundle lacks blob {blob}")
            plan.blobs.add(blob)
    plan.manifests[digest] = (media_type, body)


async def _store(plan: Plan, received: Received, storage: Storage) -> int:
    """Blobs, then manifests, then tags: nothing ever points to what is not stored yet.
    The store and the index enter what they store into the ledger (with references)."""
    new = 0
    for digest in sorted(plan.blobs):
        if digest in received.spools:
            storage.store.commit(received.spools.pop(digest)[0], digest)
            new += 1
        else:  # stored already: imported content counts as just used
            storage.metadata.record_blob(digest, storage.store.size(digest) or 0)
    cached = _closure(plan, [digest for _, _, digest in plan.tags] + plan.cached_digests)
    for digest, (media_type, body) in plan.manifests.items():
        if digest in cached:  # a pushed one is stored as a push stores it (_host)
            await storage.index.put_manifest(digest, media_type, body)
    now = time.time()
    for route, tag, digest in plan.tags:
        media_type, body = plan.manifests[digest]
        # An index answers only clients that accept indexes; a single-platform manifest
        # answers both kinds (as proxy.py records them).
        for accept_class in ("index",) if media_type in LIST_TYPES else ("index", "manifest"):
            record = TagRecord(digest, media_type, len(body), now)
            await storage.index.put_tag(route.key, tag, accept_class, record)
    for route in plan.routes:
        await storage.index.add_repository(route.catalog_name)
    return new
