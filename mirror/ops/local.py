"""What the operator commands (prefetch, export, import, ls, du) share: image references as a
person types them, and a mirror's storage opened from a process beside the running server.

An image is written as a client pulls it from this mirror: `alpine:3.19`,
`library/alpine@sha256:...`, `quay.io/coreos/etcd:v3.5` (a leading upstream name or alias
picks the upstream, as `/v2/<name>` routing does), with the tag `latest` when none is given.
An upstream name may carry a port (`127.0.0.1:15300/team/app`, as the config allows and
containerd's `?ns=` needs): a port is no part of a repository name, so that first component
is checked as an upstream name and only the rest as a repository name.
The storage is opened without the server's start-up housekeeping: its `tmp/` holds the
spool files of fills the running server is writing, which a second process must not remove,
and the metadata database (storage/sqlite.py) is safe to share with the server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import quote

from ..config import UPSTREAM_NAME, Config
from ..errors import RegistryError
from ..reference import Route, Router, is_digest, parse_digest, parse_name, parse_tag
from ..storage.blobs import BlobStore
from ..storage.index import Index
from ..storage.memory import Memory
from ..storage.sqlite import SqliteMetadata


class CommandError(Exception):
    """A command cannot go on; the message is what the operator reads."""


@dataclass(frozen=True)
class Image:
    name: str       # as the client writes it, routed like /v2/<name>
    reference: str  # a tag or a digest
    text: str       # as it was typed, for messages

    @property
    def by_digest(self) -> bool:
        return is_digest(self.reference)

    def path(self, kind: str, reference: str) -> str:
        """`/v2/<name>/<kind>/<reference>` as a client asks this mirror for it. An upstream
        name with a port goes in `?ns=` (as containerd sends it): no repository name may
        carry a port, so `/v2/127.0.0.1:15300/team/app/...` could not be routed."""
        first, _, rest = self.name.partition("/")
        if ":" in first:
            return f"/v2/{rest}/{kind}/{reference}?ns={quote(first, safe='')}"
        return f"/v2/{self.name}/{kind}/{reference}"


def parse_image(text: str) -> Image:
    """`name[:tag]` or `name@digest`; a CommandError naming the image when it is malformed."""
    text = text.strip()
    try:
        if "@" in text:
            name, reference = text.split("@", 1)
            parse_digest(reference)
        elif text.rfind(":") > text.rfind("/"):
            name, reference = text.rsplit(":", 1)
            parse_tag(reference)
        else:
            name, reference = text, "latest"
        first, _, rest = name.partition("/")
        if rest and ":" in first and UPSTREAM_NAME.fullmatch(first):
            parse_name(rest)  # host:port/<name>: routed by route_image to that upstream
        else:
            parse_name(name)
    except RegistryError as e:
        raise CommandError(f"{text}: {e.message}") from None
    return Image(name, reference, text)


def route_image(router: Router, image: Image) -> Route:
    first, _, rest = image.name.partition("/")
    try:
        if ":" in first:  # host:port, which only an upstream name can be (see parse_image)
            if first not in router.by_prefix:
                raise CommandError(
                    f"{image.text}: no upstream named {first} is configured here (configured: "
                    f"{', '.join(sorted(router.by_prefix)) or 'none'})")
            return router.route(rest, prefix=first)
        return router.route(image.name)
    except RegistryError as e:
        raise CommandError(f"{image.text}: {e.message}") from None


def full_reference(route: Route, reference: str) -> str:
    """`docker.io/library/alpine:3.19`: the name another mirror routes back to this upstream."""
    return f"{route.key}{'@' if is_digest(reference) else ':'}{reference}"


class Storage:
    """Metadata, index and blob store of `config.storage.root`, for one command's lifetime.
    (housekeeping.gc opens uploads too, which expires them: not for read-only tools.)"""

    def __init__(self, config: Config, create: bool = False):
        root = config.storage.root
        if create:  # an import may be what starts a new (air-gapped) mirror's cache
            os.makedirs(root, exist_ok=True)
        elif not os.path.isdir(root):
            raise CommandError(f"storage.root {root} does not exist; is --config the "
                               "mirror's config?")
        # Index and BlobStore keep the ledger as they store (the server's own rules); the
        # spools in tmp/ are left alone, as they may be the running server's fills.
        self.metadata = SqliteMetadata(root)
        self.store = BlobStore(root, self.metadata)
        self.memory = Memory()
        self.index = Index(self.metadata, self.memory)

    async def close(self) -> None:
        await self.metadata.close()
        await self.memory.close()


def image_blobs(document: dict) -> list[tuple[str, int | None]]:
    """(digest, size) of the blobs a single-platform manifest stores: its config, layers (an
    artifact's blobs). Foreign layers, which carry `urls`, are not served by registries, so
    clients never ask for them and the cache never holds them. Schema1 states no sizes."""
    found: list[tuple[str, int | None]] = []
    descriptors = [document.get("config"), *(document.get("layers") or []),
                   *(document.get("blobs") or [])]
    for d in descriptors:
        if isinstance(d, dict) and isinstance(d.get("digest"), str) and not d.get("urls"):
            size = d.get("size")
            found.append((d["digest"], size if isinstance(size, int) else None))
    for layer in document.get("fsLayers") or []:
        if isinstance(layer, dict) and isinstance(layer.get("blobSum"), str):
            found.append((layer["blobSum"], None))
    return found


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
