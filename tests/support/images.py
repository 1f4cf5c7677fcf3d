"""Real container images, built byte-for-byte in Python and pushed through the registry API.

It owns what the upstream holds: deterministic layers (real tar files from `tarfile`,
fixed metadata, gzip with mtime=0, seeded pseudo-random payloads) so every digest is the
same on every run; Docker schema2, OCI manifest and OCI index documents, serialized once
and pushed as exactly those bytes so `Image.digest == sha256(Image.manifest)`; and the
registry writes (push, re-tag, delete) done with an `admin` token minted in-process, so
seeding never shows in the token server's counters. `seed()` pushes the standard set;
`push_image()`, `tag_image()` and `delete_tag()` let a test change the upstream mid-run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from .registry import Registry
from .tokens import TokenServer

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

MiB = 1024 * 1024


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    name: str                 # repository, e.g. "library/alpine"
    tags: list[str]           # tags pointing at it (empty for an index's children)
    digest: str               # sha256 of `manifest`
    manifest: bytes           # the exact bytes pushed
    media_type: str
    blobs: dict[str, bytes]   # digest -> bytes: config + layers (+ all children's, for an index)
    children: list["Image"] = field(default_factory=list)
    platform: dict[str, str] | None = None  # {"os", "architecture"}; None for an index

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.manifest)

    @property
    def config_digest(self) -> str | None:
        return self.document.get("config", {}).get("digest")

    @property
    def layer_digests(self) -> list[str]:
        return [layer["digest"] for layer in self.document.get("layers", [])]


# -- building --------------------------------------------------------------------------


def random_bytes(size: int, seed: str | int) -> bytes:
    """Incompressible but reproducible: the same seed gives the same bytes on every run.
    (randbytes takes at most 2**28 bytes at once: bigger ones are made in pieces.)"""
    generator, piece = random.Random(seed), 64 << 20
    if size <= piece:
        return generator.randbytes(size)
    return b"".join(generator.randbytes(min(piece, size - start))
                    for start in range(0, size, piece))


def make_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A gzip'd tar of `files`; returns (blob, diff_id = sha256 of the uncompressed tar).

    Every varying field is pinned (mtime, owner, mode, member order, gzip header time) so
    the blob's digest depends on nothing but `files`.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(files[path]), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(files[path]))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha256(tar_bytes)


def _serialize(document: dict[str, Any]) -> bytes:
    # Indented on purpose: a mirror that re-serializes instead of keeping bytes changes
    # the digest, and tests should catch that.
    return json.dumps(document, indent=3).encode()


def build_image(name: str, tags: list[str], layers: list[dict[str, bytes]], *,
                oci: bool = False, os: str = "linux", arch: str = "amd64",
                label: str = "") -> Image:
    """A single-platform image: Docker schema2 (default) or OCI, one layer per dict."""
    config_type, layer_type, manifest_type = (
        (OCI_CONFIG, OCI_LAYER, OCI_MANIFEST) if oci else (DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST))
    blobs: dict[str, bytes] = {}
    layer_descriptors, diff_ids = [], []
    for files in layers:
        blob, diff_id = make_layer(files)
        blobs[sha256(blob)] = blob
        diff_ids.append(diff_id)
        layer_descriptors.append({"mediaType": layer_type, "size": len(blob), "digest": sha256(blob)})
    config = _serialize({
        "architecture": arch, "os": os, "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"],
                   "Labels": {"test.image": f"{name}:{label}"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    blobs[sha256(config)] = config
    manifest = _serialize({
        "schemaVersion": 2, "mediaType": manifest_type,
        "config": {"mediaType": config_type, "size": len(config), "digest": sha256(config)},
        "layers": layer_descriptors,
    })
    return Image(name=name, tags=list(tags), digest=sha256(manifest), manifest=manifest,
                 media_type=manifest_type, blobs=blobs, platform={"os": os, "architecture": arch})


def build_index(name: str, tags: list[str], children: list[Image]) -> Image:
    """An OCI index over `children` (which must be single-platform images of `name`)."""
    manifest = _serialize({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": c.media_type, "size": len(c.manifest), "digest": c.digest,
                       "platform": c.platform} for c in children],
    })
    blobs = {d: b for child in children for d, b in child.blobs.items()}
    return Image(name=name, tags=list(tags), digest=sha256(manifest), manifest=manifest,
                 media_type=OCI_INDEX, blobs=blobs, children=children)


def small_image(name: str, tags: list[str], seed: str | int, *, size: int = 1024,
                oci: bool = False) -> Image:
    """A one-layer image whose content (and so every digest) is unique to (name, seed)."""
    files = {"seed.txt": f"{name} {seed}\n".encode(), "data.bin": random_bytes(size, f"{name}/{seed}")}
    return build_image(name, tags, [files], oci=oci, label=str(seed))


def standard_images() -> dict[str, Image]:
    """The upstream every test starts from, keyed by repository name."""
    alpine = build_image("library/alpine", ["3.19", "latest"], [
        {"etc/alpine-release": b"3.19.0\n", "etc/os-release": b"NAME=\"Alpine Linux\"\nID=alpine\n",
         "bin/sh": b"#!/bin/busybox sh\n"},
        # ~3 MiB that gzip cannot shrink: big enough that a streamed body is visibly partial.
        {"opt/payload.bin": random_bytes(3 * MiB, "alpine-payload")},
    ])
    ociimage = build_image("library/ociimage", ["1.0"], [
        {"hello.txt": b"hello from an OCI image\n"},
        {"data.bin": random_bytes(64 * 1024, "ociimage")},
    ], oci=True)
    children = [build_image("library/multiarch", [], [{"arch.txt": arch.encode() + b"\n",
                                                      "bin.dat": random_bytes(4096, arch)}],
                            oci=True, arch=arch, label=arch)
                for arch in ("amd64", "arm64")]
    multiarch = build_index("library/multiarch", ["latest"], children)
    manytags = small_image("library/manytags",
                           [f"t{i:02d}" for i in range(30)] + ["v1.0", "v2.0-rc1", "latest"],
                           "manytags")
    app = build_image("team/app", ["2.0"], [{"app/main.py": b"print('app 2.0')\n"},
                                            {"app/data.bin": random_bytes(100 * 1024, "team/app")}])
    secret = small_image("private/secret", ["1"], "secret")
    return {image.name: image for image in (alpine, ociimage, multiarch, manytags, app, secret)}


# -- pushing ---------------------------------------------------------------------------


class _Client:
    """Just enough of the registry API to write, over urllib, with an admin token."""

    def __init__(self, registry: Registry, tokens: TokenServer, name: str) -> None:
        self.base = f"{registry.url}/v2/{name}"
        self.token = tokens.mint("admin", [f"repository:{name}:pull,push,delete"])

    def request(self, method: str, url: str, data: bytes | None = None,
                content_type: str | None = None) -> tuple[int, Any, bytes]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:  # urllib raises on >= 400; we want the status
            return err.code, err.headers, err.read()

    def push_blob(self, digest: str, data: bytes) -> None:
        status, _, _ = self.request("HEAD", f"{self.base}/blobs/{digest}")
        if status == 200:
            return  # already there (shared layers, re-seeding)
        status, headers, body = self.request("POST", f"{self.base}/blobs/uploads/")
        assert status == 202, (status, body)
        # Monolithic upload: one PUT to the session's Location with ?digest=.
        location = urllib.parse.urljoin(self.base, headers["Location"])
        sep = "&" if "?" in location else "?"
        status, _, body = self.request("PUT", f"{location}{sep}digest={digest}", data,
                                       "application/octet-stream")
        assert status == 201, (status, body)

    def put_manifest(self, reference: str, image: Image) -> None:
        status, headers, body = self.request("PUT", f"{self.base}/manifests/{reference}",
                                             image.manifest, image.media_type)
        assert status == 201, (status, body)
        # The registry hashes what it received: equal digests prove the bytes arrived intact.
        assert headers["Docker-Content-Digest"] == image.digest


def push(registry: Registry, tokens: TokenServer, image: Image) -> Image:
    """Push blobs, then children (by digest), then the manifest under each of its tags."""
    client = _Client(registry, tokens, image.name)
    for child in image.children:
        push(registry, tokens, child)
    own_blobs = set(image.blobs) - {d for c in image.children for d in c.blobs}
    for digest in sorted(own_blobs):
        client.push_blob(digest, image.blobs[digest])
    for reference in image.tags or [image.digest]:
        client.put_manifest(reference, image)
    return image


def seed(registry: Registry, tokens: TokenServer) -> dict[str, Image]:
    """Push the standard images; returns them keyed by repository name."""
    images = standard_images()
    for image in images.values():
        push(registry, tokens, image)
    return images


def push_image(registry: Registry, tokens: TokenServer, name: str, tag: str,
               seed: str | int, *, size: int = 1024, oci: bool = False) -> Image:
    """Build a fresh image distinct from any other (name, seed) and push it as name:tag.

    Pushing an existing tag moves it: that is how a test makes the upstream change.
    """
    return push(registry, tokens, small_image(name, [tag], seed, size=size, oci=oci))


def tag_image(registry: Registry, tokens: TokenServer, image: Image, tag: str) -> None:
    """Point `tag` of image.name at an already-pushed image (moving it if it exists)."""
    _Client(registry, tokens, image.name).put_manifest(tag, image)
    if tag not in image.tags:
        image.tags.append(tag)


def delete_manifest(registry: Registry, tokens: TokenServer, name: str, digest: str) -> None:
    """Delete a manifest by digest; every tag pointing at it goes with it."""
    client = _Client(registry, tokens, name)
    status, _, body = client.request("DELETE", f"{client.base}/manifests/{digest}")
    assert status == 202, (status, body)


def delete_tag(registry: Registry, tokens: TokenServer, name: str, tag: str) -> None:
    """Remove one tag, leaving the manifest (and any other tags) in place."""
    # Distribution 2.8 has no API to delete a tag alone (DELETE by tag is refused), so do
    # what its own untag does on the filesystem driver: remove the tag's directory.
    path = (registry.storage / "docker/registry/v2/repositories" / name / "_manifests/tags" / tag)
    if not path.is_dir():
        raise KeyError(f"{name}:{tag} not found")
    shutil.rmtree(path)
