"""Air-gap bundles: `mirror export` writes cached images as an OCI image layout in a tar file.

    bundle.tar
      oci-layout                     {"imageLayoutVersion": "1.0.0"}
      index.json                     one descriptor per image, annotated with its full
                                     reference: org.opencontainers.image.ref.name =
                                     docker.io/library/alpine:3.19 for a cached image, the
                                     pushed name (team/app:1.0) plus mirror.hosted = "true"
                                     for a hosted one
      blobs/sha256/<hex>             manifests (byte-exact, parents before children), then
                                     configs and layers, each once

It is the standard layout (image-spec "image-layout"), so skopeo and other tools read it
(`skopeo copy oci-archive:bundle.tar:docker.io/library/alpine:3.19 ...`); the full
reference is what lets `mirror import` (unbundle.py) put each image back under the
upstream it came from, and a hosted (pushed) image back into a hosted repository of the
same name. A name is hosted when the server would answer it from a hosted repository (one
exists under that name, and no upstream keeps the name for itself); otherwise it is looked up
in the cache. Export reads storage directly, so it works with the mirror stopped and sends
no request anywhere; an index is carried with the platforms the cache holds (a pushed index
has all of them: a push needs every child first).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..cache.names import reserved
from ..config import Config
from ..media import DOCKER_SCHEMA1_SIGNED, OCI_INDEX
from ..reference import Router
from ..storage.metadata import HostedRepository
from .local import (
    CommandError,
    Image,
    Storage,
    full_reference,
    human_size,
    image_blobs,
    parse_image,
    route_image,
)
from .progress import Progress, bar

LAYOUT = b'{"imageLayoutVersion": "1.0.0"}'
REF_NAME = "org.opencontainers.image.ref.name"
# Marks a pushed image, so that import hosts it again instead of filing it under an
# upstream. Without it a name whose first part is no upstream configured at the importing
# mirror (quay.io/team/app exported where quay.io is configured) would turn into a hosted
# repository silently.
HOSTED = "mirror.hosted"
COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Chosen:
    """One image of the bundle: its top-level manifest and the reference it is known by."""
    reference: str
    digest: str
    media_type: str
    size: int
    hosted: bool = False


@dataclass
class Contents:
    images: list[Chosen] = field(default_factory=list)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # insertion order
    blobs: dict[str, int] = field(default_factory=dict)
    missing_platforms: int = 0


def blob_name(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"blobs/{algorithm}/{encoded}"


def export(config: Config, texts: list[str], output: str) -> int:
    if not texts:
        raise CommandError("nothing to export: name the cached images")
    return asyncio.run(_export(config, texts, Path(output)))


async def _export(config: Config, texts: list[str], output: Path) -> int:
    started, progress = time.monotonic(), Progress()
    storage = Storage(config)
    try:
        router, contents = Router(config.upstreams), Contents()
        for text in texts:  # every image is checked before a byte is written
            chosen = await _choose(storage, router, text)
            contents.images.append(chosen)
            await _collect(storage, chosen, contents)
        _write(storage, contents, output, progress)
    finally:
        progress.close()
        await storage.close()
    if contents.missing_platforms:
        print(f"note: {contents.missing_platforms} platform manifest(s) of the indexes are not "
              "cached and are not in the bundle", flush=True)
    size = sum(contents.blobs.values()) + sum(len(b) for _, b in contents.manifests.values())
    print(f"exported {len(contents.images)} image(s) to {output}: {len(contents.manifests)} "
          f"manifests, {len(contents.blobs)} blobs, {human_size(size)} ({size} bytes), in "
          f"{time.monotonic() - started:.1f}s", flush=True)
    return 0


async def _choose(storage: Storage, router: Router, text: str) -> Chosen:
    """The cached top-level manifest of an image; the index answer of a tag is preferred."""
    image = parse_image(text)
    if ":" not in image.name.partition("/")[0] and reserved(image.name, router) is None:
        repository = await storage.metadata.hosted(image.name)
        if repository is not None:  # answered from there, never upstream (api/routes.py)
            return await _choose_hosted(storage, image, repository)
    route = route_image(router, image)
    reference = full_reference(route, image.reference)
    if image.by_digest:
        found = await storage.index.manifest(image.reference)
        if found is None:
            raise CommandError(f"{text} is not cached here (no manifest {image.reference})")
        return Chosen(reference, image.reference, found[0], len(found[1]))
    for accept_class in ("index", "manifest"):
        record = await storage.index.tag(route.key, image.reference, accept_class)
        if record is not None and await storage.index.manifest(record.digest) is not None:
            return Chosen(reference, record.digest, record.media_type, record.size)
    raise CommandError(f"{text} is not cached here ({reference} has no tag record) and "
                       f"{image.name} is no hosted repository; prefetch it first")


async def _choose_hosted(storage: Storage, image: Image, repository: HostedRepository) -> Chosen:
    """The pushed manifest that `image` names in its hosted repository."""
    if image.by_digest:
        digest = image.reference if image.reference in repository.manifests else None
    else:
        digest = repository.tags.get(image.reference)
    if digest is None:
        tags = ", ".join(sorted(repository.tags)) or "none"
        raise CommandError(f"{image.text}: the hosted repository {image.name} has no "
                           f"{'manifest' if image.by_digest else 'tag'} {image.reference} "
                           f"(its tags: {tags})")
    found = await storage.index.manifest(digest)
    if found is None:
        raise CommandError(f"{image.text}: the pushed manifest {digest} is missing from "
                           "storage (see `mirror verify`); push the image again")
    separator = "@" if image.by_digest else ":"
    return Chosen(f"{image.name}{separator}{image.reference}", digest, found[0],
                  len(found[1]), hosted=True)


async def _collect(storage: Storage, chosen: Chosen, contents: Contents) -> None:
    """The image's manifests (parents first) and blobs. An index's platform manifests that
    the cache does not hold are left out; an image's missing blob stops the export."""
    pending: list[tuple[str, bool]] = [(chosen.digest, True)]
    while pending:
        digest, required = pending.pop(0)
        if digest in contents.manifests:
            continue
        found = await storage.index.manifest(digest)
        if found is None:
            if required or chosen.hosted:
                raise CommandError(f"{chosen.reference}: manifest {digest} is not "
                                   f"{_where(chosen)}")
            contents.missing_platforms += 1
            continue
        media_type, body = found
        if media_type == DOCKER_SCHEMA1_SIGNED:
            raise CommandError(f"{chosen.reference}: a signed schema1 manifest is not named by "
                               "the digest of its bytes, so no OCI layout can carry it")
        contents.manifests[digest] = found
        document = json.loads(body)
        if isinstance(document.get("manifests"), list):
            pending += [(e["digest"], False) for e in document["manifests"]
                        if isinstance(e, dict) and isinstance(e.get("digest"), str)]
            continue
        for blob, _ in image_blobs(document):
            size = storage.store.size(blob)
            if size is None:
                again = "push it again" if chosen.hosted else "prefetch it again"
                raise CommandError(f"{chosen.reference} is not wholly {_where(chosen)}: blob "
                                   f"{blob} is missing; {again}")
            contents.blobs[blob] = size


def _where(chosen: Chosen) -> str:
    return "stored" if chosen.hosted else "cached"


def _layout_index(contents: Contents) -> bytes:
    manifests = [{"mediaType": c.media_type, "digest": c.digest, "size": c.size,
                  "annotations": {REF_NAME: c.reference, **({HOSTED: "true"} if c.hosted else {})}}
                 for c in contents.images]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests},
                      indent=2).encode()


def _write(storage: Storage, contents: Contents, output: Path, progress: Progress) -> None:
    """Write to a `.part` file renamed at the end: a bundle that exists is a whole one."""
    part = output.with_name(output.name + ".part")
    total = sum(contents.blobs.values())
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        progress.status(f"{bar(done[0], total)} {human_size(done[0])} / {human_size(total)}")

    try:
        with tarfile.open(part, "w", copybufsize=COPY_CHUNK) as tar:
            _add(tar, "oci-layout", io.BytesIO(LAYOUT), len(LAYOUT))
            layout_index = _layout_index(contents)
            _add(tar, "index.json", io.BytesIO(layout_index), len(layout_index))
            algorithms = {d.partition(":")[0] for d in [*contents.manifests, *contents.blobs]}
            for directory in ["blobs", *(f"blobs/{a}" for a in sorted(algorithms))]:
                info = tarfile.TarInfo(directory)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
                tar.addfile(info)
            # Manifests first: an importer reading the stream knows them when they arrive.
            for digest, (_, body) in contents.manifests.items():
                _add(tar, blob_name(digest), io.BytesIO(body), len(body))
            for digest, size in contents.blobs.items():
                with open(storage.store.path(digest), "rb") as f:
                    _add(tar, blob_name(digest), Counted(f, advance), size)
        os.replace(part, output)
    except FileNotFoundError as e:  # evicted after it was chosen
        part.unlink(missing_ok=True)
        raise CommandError(f"a blob left the cache during the export ({e.filename}); "
                           "nothing was written") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _add(tar: tarfile.TarFile, name: str, source: BinaryIO, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    tar.addfile(info, source)


class Counted:
    """A file whose reads are reported, so the progress line moves while tarfile copies."""

    def __init__(self, file: BinaryIO, advance):
        self.file, self.advance = file, advance

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.advance(len(data))
        return data
