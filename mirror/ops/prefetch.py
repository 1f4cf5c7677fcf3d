"""Warming the cache: `mirror prefetch` pulls images through the running mirror, as a client.

It asks the mirror exactly what a client would — the manifest by tag or digest with every
media type accepted, then each platform's manifest of an index (or only `--platform`'s),
then every blob, read and discarded with its byte count checked — so the mirror's own
fills, digest checks, tag records and ledger do all the storing, and a prefetched image is
cached exactly as a pulled one. Nothing here writes to storage except `--pin`, which marks
an image's top-level manifest in the ledger as never to be evicted; when the mirror's
storage is on this host, each image is also confirmed stored there. A blob shared by
several images is fetched once; at most `--jobs` requests are in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .. import media
from ..config import Config
from ..storage.blobs import BlobStore
from ..storage.sqlite import SqliteMetadata
from .local import CommandError, Image, human_size, image_blobs, parse_image
from .progress import Progress, bar

ACCEPT = ", ".join(media.ALL_TYPES)
READ_CHUNK = 1 << 20
# How long a blob read whole may take to appear in the mirror's store (fsync and rename).
COMMIT_WAIT = 10.0


class Failed(Exception):
    """One image could not be prefetched; the message is the mirror's own explanation."""


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def matches(self, descriptor: dict) -> bool:
        platform = descriptor.get("platform")
        return isinstance(platform, dict) and platform.get("os") == self.os \
            and platform.get("architecture") == self.architecture \
            and (self.variant is None or platform.get("variant") == self.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def parse_platform(text: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise CommandError(f"--platform {text!r}: expected os/arch[/variant], like linux/arm64")
    return Platform(*parts)


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes


@dataclass
class Tally:
    images: int = 0
    manifests: int = 0
    blobs: int = 0       # distinct blobs fetched whole
    bytes: int = 0       # blob bytes received
    expected: int = 0    # blob bytes known to be needed so far (grows as manifests arrive)
    failures: list[tuple[str, str]] = field(default_factory=list)


class Prefetch:
    def __init__(self, session: aiohttp.ClientSession, base: str, platform: Platform | None,
                 jobs: int, progress: Progress, images: int):
        self.session = session
        self.base = base.rstrip("/")
        self.platform = platform
        self.slots = asyncio.Semaphore(jobs)
        self.progress = progress
        self.total_images = images
        self.tally = Tally()
        self._blobs: dict[str, asyncio.Future[None]] = {}
        self._counted: set[str] = set()  # blobs whose size is in tally.expected

    async def image(self, image: Image) -> tuple[list[Manifest], list[str]]:
        """Fetch every manifest and blob of one image; its manifests (the top-level one
        first) and its blobs' digests."""
        manifests = [await self._manifest(image, image.reference)]
        blobs: dict[str, int | None] = {}
        await self._walk(image, manifests[0], blobs, manifests)
        await asyncio.gather(*(self._blob(image, d, size) for d, size in blobs.items()))
        return manifests, list(blobs)

    async def _walk(self, image: Image, manifest: Manifest, blobs: dict[str, int | None],
                    seen: list[Manifest]) -> None:
        document = _document(manifest)
        entries = document.get("manifests")
        if isinstance(entries, list):  # an index: its platforms' manifests
            wanted = [e for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)
                      and (self.platform is None or self.platform.matches(e))]
            if not wanted:
                raise Failed(f"the index {manifest.digest} has no manifest for {self.platform}")
            children = await asyncio.gather(*(self._manifest(image, e["digest"]) for e in wanted))
            seen += children
            for child in children:
                await self._walk(image, child, blobs, seen)
            return
        for digest, size in image_blobs(document):
            if digest not in self._counted:
                self._counted.add(digest)
                self.tally.expected += size or 0
            blobs[digest] = size

    async def _manifest(self, image: Image, reference: str) -> Manifest:
        url = self.base + image.path("manifests", reference)
        async with self.slots:
            try:
                async with self.session.get(url, headers={"Accept": ACCEPT}) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise Failed(f"manifest {reference}: {_error(response.status, body)}")
                    header = response.headers.get("Docker-Content-Digest")
                    media_type = response.headers.get("Content-Type", "").split(";")[0]
            except aiohttp.ClientError as e:
                raise Failed(f"manifest {reference}: cannot reach the mirror at {self.base}: "
                             f"{e}") from None
        expected = reference if ":" in reference else header
        algorithm = (expected or "sha256:").partition(":")[0]
        computed = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
        # A signed schema1 manifest's digest is not that of its bytes (see proxy.py).
        if expected and expected != computed and media_type != media.DOCKER_SCHEMA1_SIGNED:
            raise Failed(f"the mirror sent a manifest for {reference} that does not match "
                         f"{expected}")
        self.tally.manifests += 1
        return Manifest(expected or computed, media_type, body)

    def _blob(self, image: Image, digest: str, size: int | None) -> asyncio.Future[None]:
        """The one fetch of `digest`, shared by every image that has it."""
        fetch = self._blobs.get(digest)
        if fetch is None:
            fetch = self._blobs[digest] = asyncio.ensure_future(
                self._fetch_blob(image, digest, size))
        return fetch

    async def _fetch_blob(self, image: Image, digest: str, size: int | None) -> None:
        received = 0
        async with self.slots:
            try:
                async with self.session.get(self.base + image.path("blobs", digest)) as r:
                    if r.status != 200:
                        raise Failed(f"blob {digest}: {_error(r.status, await r.read())}")
                    async for chunk in r.content.iter_chunked(READ_CHUNK):
                        received += len(chunk)
                        self.tally.bytes += len(chunk)
                        self.draw()
            except aiohttp.ClientError as e:
                # The mirror ends a response short when its fill failed (Content-Length
                # was promised): that is a failed blob, never a complete one.
                raise Failed(f"blob {digest}: the response broke off after {received} bytes "
                             f"({e.__class__.__name__})") from None
        if size is not None and received != size:
            raise Failed(f"blob {digest}: received {received} bytes, the manifest says {size}")
        self.tally.blobs += 1

    def draw(self, force: bool = False) -> None:
        t = self.tally
        done = t.images + len(t.failures)
        self.progress.status(f"{bar(t.bytes, t.expected)} {human_size(t.bytes)} / "
                             f"{human_size(t.expected)}  images {done}/{self.total_images}  "
                             f"blobs {t.blobs}", force)


def _document(manifest: Manifest) -> dict:
    try:
        document = json.loads(manifest.body)
    except ValueError:
        raise Failed(f"the manifest {manifest.digest} is not JSON") from None
    if not isinstance(document, dict):
        raise Failed(f"the manifest {manifest.digest} is not a JSON object")
    return document


def _error(status: int, body: bytes) -> str:
    """The mirror's OCI error as `CODE: message`, or the bare status."""
    try:
        error = json.loads(body)["errors"][0]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, IndexError, TypeError):
        return f"HTTP {status}"


class Local:
    """The mirror's storage, when it is on this host (the ledger of --config's storage.root
    exists): where --pin marks images, and where each image's blobs are confirmed stored.
    A fill hands its last byte to readers once the digest checked out and renames the file
    into the store a moment later (or never, on a full disk): a blob read whole is not yet
    a cached one."""

    def __init__(self, root: str):
        self.metadata = SqliteMetadata(root)
        self.store = BlobStore(root, self.metadata)

    def close(self) -> None:
        self.metadata.close_now()

    async def unstored(self, digests: list[str]) -> list[str]:
        """The blobs still not in the store after waiting up to COMMIT_WAIT for them."""
        deadline = time.monotonic() + COMMIT_WAIT
        while True:
            digests = [d for d in digests if self.store.size(d) is None]
            if not digests or time.monotonic() > deadline:
                return digests
            await asyncio.sleep(0.05)

    async def pin(self, manifests: list[Manifest]) -> None:
        """Pin the image's top-level manifest. The mirror enters what it stores into the
        ledger; what is not there (yet) is added here, with its references, so that the
        pin keeps the whole image."""
        for manifest in manifests:
            if await self.metadata.item(manifest.digest) is None:
                await self.metadata.put_manifest(manifest.digest, manifest.media_type,
                                                 manifest.body, media.references(manifest.body))
        await self.metadata.pin(manifests[0].digest)


def read_list(path: str) -> list[str]:
    """One image per line; blank lines and # comments are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None
    return [line for line in lines if line]


def default_url(config: Config) -> str:
    scheme = "https" if config.server.tls_certificate else "http"
    return f"{scheme}://127.0.0.1:{config.server.port}"


def run(config: Config, texts: list[str], platform: str | None, pin_images: bool,
        url: str | None, jobs: int) -> int:
    if not texts:
        raise CommandError("nothing to prefetch: name images, or --file LIST")
    if jobs < 1:
        raise CommandError("--jobs must be at least 1")
    images = [parse_image(text) for text in texts]
    wanted = parse_platform(platform) if platform else None
    root = Path(config.storage.root)
    local = (root / "metadata.sqlite").exists() or (root / "index" / "usage.sqlite").exists()
    if pin_images and not local:  # or --pin would start a ledger nobody reads
        raise CommandError(f"--pin: {config.storage.root} holds no mirror's ledger; --config "
                           "must be the config of the mirror being prefetched into")
    return asyncio.run(_run(config, images, wanted, pin_images, url, jobs,
                            Local(config.storage.root) if local else None))


async def _run(config: Config, images: list[Image], platform: Platform | None,
               pin_images: bool, url: str | None, jobs: int, local: Local | None) -> int:
    started, progress = time.monotonic(), Progress()
    # The default URL is this host's own mirror over loopback, whose certificate names the
    # hosts clients use (maybe not 127.0.0.1): it is not verified. A given URL is.
    verify = url is not None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10,
                                    sock_read=max(60.0, 2 * config.limits.stall_timeout))
    async with aiohttp.ClientSession(
            auto_decompress=False, timeout=timeout,
            connector=aiohttp.TCPConnector(limit=jobs, ssl=None if verify else False)) as session:
        prefetch = Prefetch(session, url or default_url(config), platform, jobs, progress,
                            len(images))

        async def one(image: Image) -> None:
            try:
                manifests, blobs = await prefetch.image(image)
                if local is not None and (unstored := await local.unstored(blobs)):
                    raise Failed(f"blob {unstored[0]}: the mirror served it but it is not in "
                                 f"{config.storage.root} (a full disk, or another mirror's "
                                 "--config?)")
            except Failed as e:
                prefetch.tally.failures.append((image.text, str(e)))
                progress.event(f"failed {image.text}: {e}")
                return
            if pin_images and local is not None:
                await local.pin(manifests)
            prefetch.tally.images += 1
            progress.event(f"ok {image.text} {manifests[0].digest}"
                           f"{' (pinned)' if pin_images else ''}")
            prefetch.draw(force=True)

        await asyncio.gather(*(one(image) for image in images))
    progress.close()
    if local is not None:
        local.close()
    t = prefetch.tally
    print(f"prefetched {t.images} of {len(images)} image(s): {t.manifests} manifests, "
          f"{t.blobs} blobs, {human_size(t.bytes)} ({t.bytes} bytes), {len(t.failures)} "
          f"failed, in {time.monotonic() - started:.1f}s", flush=True)
    return 1 if t.failures else 0
