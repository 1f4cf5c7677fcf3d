"""Hosted repositories: what clients push, kept beside the cache and never evicted by it.

    <root>/hosted/                     a diskcache directory
      repo:<name>                      → {"tags": {tag: digest},
                                          "manifests": {digest: media type},
                                          "blobs": {digest: size}}
      referrers:<name>:<subject>       → {digest: descriptor}  (manifests whose subject it is)

Manifest bytes live in the Index's manifest store and blob bytes in the BlobStore, so a
pushed layer and a cached one with the same digest are one file. A repository exists once
something was pushed to it (push-to-create); from then on its pulls, tag lists and misses
are answered here and never go upstream.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import diskcache

from .. import config as cfg
from ..errors import (
    BlobUnknown,
    Denied,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    Unsupported,
)
from ..media import LIST_TYPES, OCI_MANIFEST
from ..reference import Router, is_digest
from ..storage.blobs import BlobStore
from ..storage.index import Index
from .proxy import Manifest

EMPTY = {"tags": {}, "manifests": {}, "blobs": {}}


class Hosted:
    def __init__(self, root: str | Path, index: Index, store: BlobStore, config: cfg.Hosted,
                 router: Router):
        self.db = diskcache.Cache(str(Path(root) / "hosted"))
        self.index = index
        self.store = store
        self.config = config
        self.router = router
        # Every request asks whether its name is hosted: answer from memory, not SQLite.
        self._names = {key[5:] for key in self.db.iterkeys() if key.startswith("repo:")}
        # Every digest a hosted repository holds, for eviction to leave alone. Deletes do
        # not shrink it (a deleted blob is only kept until the next start): never too small.
        self.held: set[str] = set()
        for name in self._names:
            repo = self.db.get(f"repo:{name}", EMPTY)
            self.held.update(repo["blobs"], repo["manifests"])

    def close(self) -> None:
        self.db.close()

    # Repositories.
    def exists(self, name: str) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return sorted(self._names)

    def repository(self, name: str) -> dict:
        """{"tags": {tag: digest}, "manifests": {digest: type}, "blobs": {digest: size}}."""
        return self._repo(name)

    def _repo(self, name: str) -> dict:
        repo = self.db.get(f"repo:{name}")
        if repo is None:
            raise NameUnknown(f"repository {name} is not known to this registry")
        return repo

    def _save(self, name: str, repo: dict) -> None:
        self.db.set(f"repo:{name}", repo)
        self._names.add(name)
        self.held.update(repo["blobs"], repo["manifests"])

    def check_pushable(self, name: str) -> None:
        """Whether `name` may receive pushes; Denied with the reason when not."""
        if self.exists(name):
            return
        if not self.config.enabled:
            raise Unsupported(f"pushing is disabled here (hosted.enabled = false); {name} is "
                              "served from upstream registries only")
        first = name.partition("/")[0]
        if first in self.router.by_prefix and "/" in name:
            raise Denied(f"{name} is under {first}/, which this mirror serves from upstream "
                         f"{self.router.by_prefix[first].name}; push under another name")
        if self.config.prefixes and not any(name.startswith(p) for p in self.config.prefixes):
            raise Denied(f"{name} may not be hosted here; allowed prefixes: "
                         + ", ".join(self.config.prefixes))

    # Blobs.
    def blob_size(self, name: str, digest: str) -> int:
        size = self._repo(name)["blobs"].get(digest)
        if size is None or self.store.size(digest) is None:
            raise BlobUnknown(f"blob {digest} is not in {name}")
        return size

    def link_blob(self, name: str, digest: str, size: int) -> None:
        repo = self.db.get(f"repo:{name}") or json.loads(json.dumps(EMPTY))
        repo["blobs"][digest] = size
        self._save(name, repo)

    def mountable(self, digest: str, source: str | None) -> int | None:
        """The size of a blob that can be mounted: in the hosted `source`, or anywhere in the
        store (cached content is shared storage too); None if it is nowhere."""
        if source is not None and self.exists(source):
            size = self._repo(source)["blobs"].get(digest)
            if size is not None:
                return size
        return self.store.size(digest)

    def delete_blob(self, name: str, digest: str) -> None:
        self._deletable()
        repo = self._repo(name)
        if repo["blobs"].pop(digest, None) is None:
            raise BlobUnknown(f"blob {digest} is not in {name}")
        self._save(name, repo)

    # Manifests.
    def put_manifest(self, name: str, reference: str, content_type: str, body: bytes,
                     tags: list[str]) -> tuple[str, str | None]:
        """Validate and store a pushed manifest; return its digest and its subject's."""
        algorithm = reference.partition(":")[0] if is_digest(reference) else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
        if is_digest(reference) and reference != digest:
            raise DigestInvalid(f"the manifest's digest is {digest}, not {reference}")
        try:
            document = json.loads(body)
        except ValueError:
            raise ManifestInvalid("the manifest is not valid JSON") from None
        if not isinstance(document, dict):
            raise ManifestInvalid("the manifest is not a JSON object")
        media_type = content_type.partition(";")[0].strip()
        declared = document.get("mediaType")
        if declared is not None and media_type and declared != media_type:
            raise ManifestInvalid(f"Content-Type {media_type} differs from the manifest's "
                                  f"mediaType {declared}")
        media_type = media_type or declared or OCI_MANIFEST
        repo = self.db.get(f"repo:{name}") or json.loads(json.dumps(EMPTY))
        for descriptor in _references(document, media_type):
            target = descriptor.get("digest")
            if not isinstance(target, str):
                raise ManifestInvalid("a descriptor in the manifest has no digest")
            if media_type in LIST_TYPES:
                if target not in repo["manifests"]:
                    raise ManifestBlobUnknown(f"manifest {target} is not in {name}; push it first")
            elif target not in repo["blobs"]:
                size = self.store.size(target)
                if size is None:
                    raise ManifestBlobUnknown(f"blob {target} is not in {name}; push it first")
                repo["blobs"][target] = size  # already stored (cached or pushed elsewhere)
        self.index.put_manifest(digest, media_type, body)
        repo["manifests"][digest] = media_type
        for tag in ([] if is_digest(reference) else [reference]) + tags:
            repo["tags"][tag] = digest
        self._save(name, repo)
        subject = document.get("subject", {}).get("digest") \
            if isinstance(document.get("subject"), dict) else None
        if isinstance(subject, str):
            self._add_referrer(name, subject, _descriptor(document, media_type, digest, body))
        return digest, subject

    def manifest(self, name: str, reference: str) -> Manifest:
        repo = self._repo(name)
        digest = reference if is_digest(reference) else repo["tags"].get(reference)
        if digest is None or digest not in repo["manifests"]:
            raise ManifestUnknown(f"{name}:{reference} is not known to this registry")
        found = self.index.manifest(digest)
        if found is None:
            raise ManifestUnknown(f"the manifest {digest} of {name} is missing from storage")
        media_type, body = found
        return Manifest(digest, media_type, len(body), body)

    def delete_manifest(self, name: str, reference: str) -> None:
        self._deletable()
        repo = self._repo(name)
        if not is_digest(reference):  # deleting a tag removes the tag, not the manifest
            if repo["tags"].pop(reference, None) is None:
                raise ManifestUnknown(f"{name}:{reference} is not known to this registry")
            self._save(name, repo)
            return
        if repo["manifests"].pop(reference, None) is None:
            raise ManifestUnknown(f"{name}@{reference} is not known to this registry")
        repo["tags"] = {t: d for t, d in repo["tags"].items() if d != reference}
        self._save(name, repo)
        found = self.index.manifest(reference)
        if found is not None:
            subject = json.loads(found[1]).get("subject")
            if isinstance(subject, dict) and isinstance(subject.get("digest"), str):
                key = f"referrers:{name}:{subject['digest']}"
                referrers = self.db.get(key, {})
                referrers.pop(reference, None)
                self.db.set(key, referrers)

    def tags(self, name: str) -> list[str]:
        return sorted(self._repo(name)["tags"])

    # Referrers (distribution-spec v1.1 "Listing Referrers").
    def _add_referrer(self, name: str, subject: str, descriptor: dict) -> None:
        key = f"referrers:{name}:{subject}"
        referrers = self.db.get(key, {})
        referrers[descriptor["digest"]] = descriptor
        self.db.set(key, referrers)

    def referrers(self, name: str, subject: str, artifact_type: str | None) -> list[dict]:
        self._repo(name)
        found = self.db.get(f"referrers:{name}:{subject}", {})
        return [d for d in sorted(found.values(), key=lambda d: d["digest"])
                if artifact_type is None or d.get("artifactType") == artifact_type]

    def _deletable(self) -> None:
        if not self.config.delete:
            raise Unsupported("deleting is disabled here (hosted.delete = false)")


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
