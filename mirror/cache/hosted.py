"""Hosted repositories: what clients push, kept beside the cache and never evicted by it.

What a hosted repository holds (its tags, manifests, blobs and referrers) is in the
metadata store (storage/metadata.py), written in one transaction per push; manifest bytes
are the same manifest store the cache uses and blob bytes the same BlobStore, so a pushed
layer and a cached one with the same digest are one file. A repository exists once
something was pushed to it (push-to-create); from then on its pulls, tag lists and misses
are answered here and never go upstream. Which names may be hosted is names.py's rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from .. import config as cfg
from ..errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    StorageError,
    Unsupported,
)
from ..media import LIST_TYPES, OCI_MANIFEST
from ..reference import DIGEST_HEX, Router, is_digest
from ..storage.blobs import BlobStore
from ..storage.index import Index
from ..storage.metadata import HostedRepository, ManifestPush, MetadataUnavailable
from . import names
from .proxy import Manifest

log = logging.getLogger("mirror")

NAMES_REREAD = 1.0  # seconds between re-reads of the hosted names, on a miss


class Hosted:
    def __init__(self, names_: list[str], index: Index, store: BlobStore, config: cfg.Hosted,
                 router: Router, shared: bool = False):
        self.metadata = index.metadata
        self.index = index
        self.store = store
        self.config = config
        self.router = router
        # Every request asks whether its name is hosted: answer from memory, not SQLite.
        self._names = set(names_)
        self.shared = shared  # other replicas push too (cluster.redis)
        self._names_read = time.monotonic()

    @classmethod
    async def open(cls, index: Index, store: BlobStore, config: cfg.Hosted,
                   router: Router, shared: bool = False) -> "Hosted":
        return cls(await index.metadata.hosted_names(), index, store, config, router, shared)

    # Repositories.
    def exists(self, name: str) -> bool:
        return name in self._names

    async def lookup(self, name: str) -> bool:
        """Whether `name` is hosted. With shared metadata another replica may have created
        it a moment ago: a name not known here is looked up there (names are never
        removed, so a yes is remembered). While that store is down, what is known here."""
        if name in self._names:
            return True
        if not self.shared:
            # `mirror import` hosts repositories from another process: re-read the names on
            # a miss, at most once a second (not a query per pull-through request).
            if time.monotonic() - self._names_read < NAMES_REREAD:
                return False
            self._names_read = time.monotonic()
            try:
                self._names.update(await self.metadata.hosted_names())
            except StorageError as e:
                log.warning("cannot re-read the hosted repositories: %s", e.message)
            return name in self._names
        try:
            found = await self.metadata.is_hosted(name)
        except StorageError as e:
            log.warning("cannot ask whether %s is hosted: %s", name, e.message)
            return False
        if found:
            self._names.add(name)
        return found

    async def names(self) -> list[str]:
        if self.shared:  # other replicas' pushes too
            self._names.update(await self.metadata.hosted_names())
        return sorted(self._names)

    async def repository(self, name: str) -> HostedRepository:
        repo = await self.metadata.hosted(name)
        if repo is None:
            raise NameUnknown(f"repository {name} is not known to this registry")
        return repo

    def _known(self, name: str) -> None:
        """NameUnknown unless `name` is hosted (from memory: no repository load)."""
        if not self.exists(name):
            raise NameUnknown(f"repository {name} is not known to this registry")

    def check_pushable(self, name: str) -> None:
        """Whether `name` may receive pushes (the rules that need no lookup: names.py)."""
        names.check_name(name, self.config, self.router, self.exists(name))

    # Blobs.
    async def blob_size(self, name: str, digest: str) -> int:
        try:
            linked = await self.metadata.hosted_blob(name, digest)
        except MetadataUnavailable:
            # Which repository links it cannot be asked now; content by digest is the same
            # bytes for every name, and the object store still has them (see manifest()).
            linked = True
        size = await self.store.stat(digest) if linked is not None else None
        if size is None:
            raise BlobUnknown(f"blob {digest} is not in {name}")
        return size

    async def link_blob(self, name: str, digest: str) -> int | None:
        """Link a stored blob into `name` (creating the repository); its size, or None when
        the store does not hold it at the moment of linking."""
        size = await self.metadata.link_blob(name, digest, self.store.size)
        if size is not None:
            self._names.add(name)
        return size

    async def mount(self, name: str, digest: str, source: str | None) -> int | None:
        """Mount a blob the mirror holds — pushed to `source`, or anywhere in the store
        (cached content is shared storage too) — into `name`; None if it is nowhere."""
        return await self.link_blob(name, digest)

    async def delete_blob(self, name: str, digest: str) -> None:
        self._deletable()
        self._known(name)
        if not await self.metadata.delete_hosted_blob(name, digest):
            raise BlobUnknown(f"blob {digest} is not in {name}")

    # Manifests.
    async def put_manifest(self, name: str, reference: str, content_type: str, body: bytes,
                           tags: list[str]) -> tuple[str, str | None]:
        """Validate and store a pushed manifest; return its digest and its subject's."""
        algorithm = reference.partition(":")[0] if is_digest(reference) else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
        if is_digest(reference) and reference != digest:
            raise DigestInvalid(f"the manifest's digest is {digest}, not {reference}")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise ManifestInvalid("the manifest is not valid JSON") from None
        if not isinstance(document, dict):
            raise ManifestInvalid("the manifest is not a JSON object")
        media_type = content_type.partition(";")[0].strip()
        declared = document.get("mediaType")
        if declared is not None and media_type and declared != media_type:
            raise ManifestInvalid(f"Content-Type {media_type} differs from the manifest's "
                                  f"mediaType {declared}")
        media_type = media_type or declared or OCI_MANIFEST
        repo = await self.metadata.hosted(name) or HostedRepository(name)
        refs, links = [], {}
        for descriptor in _references(document, media_type):
            target = descriptor.get("digest")
            if not isinstance(target, str):
                raise ManifestInvalid("a descriptor in the manifest has no digest")
            _check_digest(target)  # before it names a file: "../../etc/passwd" is no digest
            refs.append(target)
            if media_type in LIST_TYPES:
                if target not in repo.manifests:
                    raise ManifestBlobUnknown(f"manifest {target} is not in {name}; push it first")
            elif target not in repo.blobs:
                size = await self.store.stat(target)
                if size is None:
                    raise ManifestBlobUnknown(f"blob {target} is not in {name}; push it first")
                links[target] = size  # already stored (cached or pushed elsewhere)
        subject = document.get("subject", {}).get("digest") \
            if isinstance(document.get("subject"), dict) else None
        subject = subject if isinstance(subject, str) else None
        if subject is not None:
            _check_digest(subject)  # it goes out in the OCI-Subject header, and into a key
        await self.index.keep_copy(digest, media_type, body)
        await self.metadata.push_manifest(ManifestPush(
            name, digest, media_type, body, refs, links,
            ([] if is_digest(reference) else [reference]) + tags, subject,
            _descriptor(document, media_type, digest, body) if subject else None),
            self.store.size)
        self.index.remember(digest, media_type, body)
        self._names.add(name)
        return digest, subject

    async def manifest(self, name: str, reference: str) -> Manifest:
        try:
            digest = await self.metadata.hosted_manifest(name, reference)
        except MetadataUnavailable:
            if not is_digest(reference):
                raise  # a tag needs the metadata store
            digest = reference  # by digest, from the object store's copy (index.py)
        if digest is None:
            raise ManifestUnknown(f"{name}:{reference} is not known to this registry")
        found = await self.index.manifest(digest)
        if found is None:
            raise ManifestUnknown(f"the manifest {digest} of {name} is missing from storage")
        media_type, body = found
        return Manifest(digest, media_type, len(body), body)

    async def delete_manifest(self, name: str, reference: str) -> None:
        self._deletable()
        self._known(name)
        if not is_digest(reference):  # deleting a tag removes the tag, not the manifest
            if not await self.metadata.delete_hosted_tag(name, reference):
                raise ManifestUnknown(f"{name}:{reference} is not known to this registry")
            return
        if not await self.metadata.delete_hosted_manifest(name, reference):
            raise ManifestUnknown(f"{name}@{reference} is not known to this registry")
        await self.index.forget_cached(reference, [])  # it may be gone from storage now

    async def tags(self, name: str) -> list[str]:
        return sorted((await self.repository(name)).tags)

    async def tags_page(self, name: str, after: str, limit: int) -> list[str]:
        """`limit` tags after `after`, read as one page from the metadata (a repository
        with 10,000 tags is not loaded for a page of 100)."""
        self._known(name)
        return await self.metadata.hosted_tags_page(name, after, limit)

    # Referrers (distribution-spec v1.1 "Listing Referrers").
    async def referrers(self, name: str, subject: str, artifact_type: str | None) -> list[dict]:
        self._known(name)
        return [d for d in await self.metadata.referrers(name, subject)
                if artifact_type is None or d.get("artifactType") == artifact_type]

    def _deletable(self) -> None:
        if not self.config.delete:
            raise Unsupported("deleting is disabled here (hosted.delete = false)")


def _check_digest(value: str) -> None:
    """MANIFEST_INVALID unless `value`, from a pushed manifest, is a digest."""
    algorithm, _, encoded = value.partition(":")
    if algorithm not in DIGEST_HEX or not DIGEST_HEX[algorithm].fullmatch(encoded):
        raise ManifestInvalid(f"{value[:100]!r} in the manifest is not a digest")


def _references(document: dict, media_type: str) -> list[dict]:
    """The descriptors a manifest points to that must already be in the repository."""
    if media_type in LIST_TYPES:
        entries = document.get("manifests")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ManifestInvalid("an index must list its manifests as descriptors")
        return entries
    config = document.get("config", {})
    layers = document.get("layers", [])
    if not isinstance(config, dict) or not isinstance(layers, list) or \
            not all(isinstance(layer, dict) for layer in layers):
        raise ManifestInvalid("the manifest's config or layers are malformed")
    # Foreign (non-distributable) layers live elsewhere: they carry urls and are not pushed.
    return ([config] if config else []) + [layer for layer in layers if not layer.get("urls")]


def _descriptor(document: dict, media_type: str, digest: str, body: bytes) -> dict:
    descriptor = {"mediaType": media_type, "digest": digest, "size": len(body)}
    config = document.get("config") if isinstance(document.get("config"), dict) else {}
    artifact_type = document.get("artifactType") or config.get("mediaType")
    if isinstance(artifact_type, str):
        descriptor["artifactType"] = artifact_type
    if isinstance(document.get("annotations"), dict):
        descriptor["annotations"] = document["annotations"]
    return descriptor
