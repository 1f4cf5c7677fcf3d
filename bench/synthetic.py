"""Synthetic cache content: a storage root's metadata filled as if it had served for a year.

`fill(root, ...)` writes, in one SQLite transaction into the real schema (the database is
created by the real `SqliteMetadata`, so its tables, indexes and migrations are the
mirror's own), content that the mirror reads like anything it cached itself:

- `manifests` manifests whose bytes parse and whose digest is sha256 of those bytes: OCI
  image manifests (a config and three layers each: one base layer shared by a hundred
  images, two of their own) and, one in a hundred, OCI indexes of two image manifests;
- ledger items for every manifest and blob (`items` rows in all; blobs are the configs and
  layers the manifests name, plus unreferenced ones to make up the count) with sizes
  (configs of a few KiB, layers log-uniform 100 KiB - 200 MiB) and last-use times spread
  over the past year — an image's blobs a little before their manifest, as a pull leaves
  them — and `refs` rows parent -> child for each reference;
- tag records (Accept class "index", what a client accepting every type gets) and the
  upstream's tag list for `repositories` repositories across three upstreams
  (docker.io, ghcr.io, quay.io), each in the catalog under the name a client pulls it by;
- one cached repository, `docker.io/library/big`, with `tags_in_one` tags, and the hosted
  repositories `team/app` (a few images) and `team/big` (`tags_in_one` tags).

Blob files are not written (only `blob_files` of them, for walks to find something): a
layer whose ledger row has no file is, to the mirror, a blob it does not hold. A GET of it
is a miss (a fill from the upstream; 503 when offline), eviction of it removes no file and
succeeds, and `mirror gc` does not see it (it walks files). The ledger is marked as agreeing
with the disk now, so the server's start-up reconciliation (ops/housekeeping.py) lists no
directory and keeps those rows, as it would for a real root whose files are all there.
Tag records are stamped `checked_at` = now and tag lists `fetched_at` = now, so a mirror
with a long `tag_ttl` (or `server.offline`) answers them without an upstream.

Speed: full size (1M items) takes 29-48 s on this 2-core machine under other helpers' load
(87 s before the fill's page cache was raised to 1 GiB), using that much memory while it
runs; 1% takes under a second. `python bench/synthetic.py ROOT [--scale 0.01]` fills a root
and prints what it made and the time taken.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mirror.storage.ledger import AGREES_AT, TOTAL  # noqa: E402
from mirror.storage.sqlite import SqliteMetadata  # noqa: E402

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
UPSTREAMS = ("docker.io", "ghcr.io", "quay.io")  # docker.io is the default upstream
YEAR = 365 * 86400.0
LAYERS = 3            # per image manifest: one shared base layer and two of its own
SHARED_BASE = 100     # images per base layer
INDEX_EVERY = 100     # one manifest in this many is an index
BIG, HOSTED, HOSTED_BIG = "library/big", "team/app", "team/big"
FILL_CACHE_KIB = 1 << 20  # 1 GiB of page cache while filling, then given back


@dataclass
class Filled:
    """What `fill` made, and names a benchmark can ask for."""

    root: Path
    items: int = 0
    manifests: int = 0
    indexes: int = 0
    blobs: int = 0
    refs: int = 0
    tags: int = 0
    repositories: int = 0
    total_bytes: int = 0
    seconds: float = 0.0
    # A cached image by tag (docker.io, the default upstream: `/v2/<name>/manifests/<tag>`).
    name: str = ""
    tag: str = ""
    digest: str = ""
    big: str = BIG              # the cached repository with tags_in_one tags
    hosted: str = HOSTED        # a hosted repository with a few images
    hosted_big: str = HOSTED_BIG  # the hosted repository with tags_in_one tags
    big_tags: list[str] = field(default_factory=list)


def fill(root: str | Path, *, items: int = 1_000_000, manifests: int = 200_000,
         repositories: int = 50_000, tags_in_one: int = 10_000, hosted_images: int = 20,
         blob_files: int = 0, seed: int = 13, now: float | None = None) -> Filled:
    """Fill `root` (created, or an empty storage root) with synthetic content; see above."""
    if manifests < 2 * INDEX_EVERY or repositories < 1:
        raise ValueError("at least 200 manifests and one repository")
    root = Path(root)
    SqliteMetadata(root).close_now()  # the mirror's own schema, indexes and migrations
    started = time.monotonic()
    now = time.time() if now is None else now
    made = Filled(root)
    plan = _Plan(items, manifests, repositories, tags_in_one, random.Random(seed), now)
    db = sqlite3.connect(str(root / "metadata.sqlite"), isolation_level=None)
    try:
        # One transaction: rows written together or not at all; no fsync per row. The
        # mirror's own writes stay synchronous=FULL (database.py): this is a filler.
        # The indexes are written in digest order, which is random: with SQLite's default
        # 2 MiB page cache a full-size fill spent most of its 87 s re-reading index pages.
        db.execute("PRAGMA synchronous=OFF")
        db.execute(f"PRAGMA cache_size=-{FILL_CACHE_KIB}")
        db.execute("PRAGMA journal_mode=MEMORY")  # a new file: no 800 MiB WAL to copy back
        db.execute("BEGIN IMMEDIATE")
        plan.write(db, made)
        _hosted(db, plan, made, hosted_images, tags_in_one)
        # The ledger agrees with the disk as of now (ops/housekeeping.py): a start compares
        # only blob directories changed since, so the rows of absent files stay.
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (AGREES_AT, repr(now)))
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (TOTAL, made.total_bytes))
        db.execute("COMMIT")
        db.execute("ANALYZE")  # what a long-running database has gathered (optimize)
        db.execute("PRAGMA journal_mode=WAL")  # as the mirror keeps it
    finally:
        db.close()
    if blob_files:
        _blob_files(root, plan, blob_files)
    made.seconds = time.monotonic() - started
    return made


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Plan:
    """Deterministic content: blob i's digest, size and owner are functions of i."""

    def __init__(self, items: int, manifests: int, repositories: int, tags_in_one: int,
                 rng: random.Random, now: float):
        self.rng, self.now = rng, now
        self.indexes = manifests // INDEX_EVERY
        self.images = manifests - self.indexes
        self.blobs = max(items - manifests, 0)
        # Blob numbers: configs first (one per image), then base layers, then own layers;
        # what is left over is content nothing refers to any more (gc's and eviction's).
        self.bases = max(self.images // SHARED_BASE, 1)
        self.own = self.images * (LAYERS - 1)
        if self.blobs < self.images + self.bases + self.own:
            raise ValueError(f"{items} items cannot hold {manifests} manifests and their "
                             f"{self.images + self.bases + self.own} blobs")
        self.repositories = repositories
        self.tags_in_one = tags_in_one
        self.image_digests: list[str] = []
        self.image_sizes: list[int] = []
        # Each blob is named by several rows (its item, refs, manifest bodies): hash once.
        self._blob_digests = [_digest(b"synthetic blob %d" % n) for n in range(self.blobs)]

    def blob_digest(self, number: int) -> str:
        return self._blob_digests[number]

    def blob_size(self, number: int) -> int:
        if number < self.images:
            return 1024 + number % 7168  # a config: a few KiB
        # log-uniform 100 KiB .. 200 MiB, from the number so it is the same every run
        x = (number * 2654435761 % 1000003) / 1000003
        return int(100 * 1024 * math.exp(x * math.log(2048)))

    def atime(self, image: int) -> float:
        """Last use of an image: spread over the past year, by a hash of its number."""
        return self.now - YEAR * ((image * 40503 % 65521) / 65521)

    def repository(self, image: int) -> tuple[str, str]:
        """(upstream, name) of the repository an image was pulled from."""
        number = image % self.repositories
        upstream = UPSTREAMS[number % len(UPSTREAMS)]
        if number == 0:
            return "docker.io", BIG
        name = f"library/r{number}" if upstream == "docker.io" and number % 2 else \
            f"org{number % 997}/app{number}"
        return upstream, name

    def image_manifest(self, image: int) -> bytes:
        base = self.images + image % self.bases
        own = self.images + self.bases + image * (LAYERS - 1)
        layers = [base, *range(own, own + LAYERS - 1)]
        # What json.dumps(separators=(",", ":")) writes, formatted directly (3x faster).
        descriptors = ",".join(
            f'{{"mediaType":"{OCI_LAYER}","digest":"{self.blob_digest(n)}",'
            f'"size":{self.blob_size(n)}}}' for n in layers)
        return (f'{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":'
                f'"{OCI_CONFIG}","digest":"{self.blob_digest(image)}","size":'
                f'{self.blob_size(image)}}},"layers":[{descriptors}]}}').encode()

    def image_children(self, image: int) -> list[int]:
        own = self.images + self.bases + image * (LAYERS - 1)
        return [image, self.images + image % self.bases, *range(own, own + LAYERS - 1)]

    def write(self, db: sqlite3.Connection, made: Filled) -> None:
        db.executemany("INSERT INTO items (digest, kind, size, atime) VALUES (?, ?, ?, ?)",
                       self._blob_rows(made))
        db.executemany("INSERT INTO manifests (digest, media_type, body) VALUES (?, ?, ?)",
                       self._manifest_rows(db, made))
        tags: dict[tuple[str, str], list[str]] = {}
        db.executemany("INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
                       self._tag_rows(tags, made))
        db.executemany("INSERT INTO tag_lists VALUES (?, ?, ?)",
                       ((f"{u}/{n}", json.dumps(sorted(t)), self.now)
                        for (u, n), t in tags.items()))
        db.executemany("INSERT INTO catalog VALUES (?, ?)",
                       ((n if u == "docker.io" else f"{u}/{n}", self.now)
                        for u, n in tags))
        made.repositories = len(tags)
        made.items = db.execute("SELECT count(*) FROM items").fetchone()[0]
        made.refs = db.execute("SELECT count(*) FROM refs").fetchone()[0]
        made.total_bytes = db.execute("SELECT sum(size) FROM items").fetchone()[0]

    def _blob_rows(self, made: Filled) -> Iterator[tuple]:
        for number in range(self.blobs):
            if number < self.images:
                owner = number
            elif number < self.images + self.bases:
                owner = number - self.images  # a base layer: last used with its first image
            elif number < self.images + self.bases + self.own:
                owner = (number - self.images - self.bases) // (LAYERS - 1)
            else:  # nothing refers to it: last used any time in the year
                owner = number
            yield (self.blob_digest(number), "blob", self.blob_size(number),
                   self.atime(owner) - 1.0)
        made.blobs = self.blobs

    def _manifest_rows(self, db: sqlite3.Connection, made: Filled) -> Iterator[tuple]:
        refs: list[tuple[str, str]] = []
        items: list[tuple] = []

        def flush() -> None:
            db.executemany("INSERT INTO items (digest, kind, size, atime) VALUES (?, ?, ?, ?)",
                           items)
            db.executemany("INSERT OR IGNORE INTO refs (parent, child) VALUES (?, ?)", refs)
            items.clear()
            refs.clear()

        for image in range(self.images):
            body = self.image_manifest(image)
            digest = _digest(body)
            self.image_digests.append(digest)
            self.image_sizes.append(len(body))
            items.append((digest, "manifest", len(body), self.atime(image)))
            refs.extend((digest, self.blob_digest(n)) for n in self.image_children(image))
            yield digest, OCI_MANIFEST, body
            if len(items) >= 10000:
                flush()
        for number in range(self.indexes):
            pair = (2 * number % self.images, (2 * number + 1) % self.images)
            body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": self.image_digests[i],
                 "size": self.image_sizes[i],
                 "platform": {"architecture": arch, "os": "linux"}}
                for i, arch in zip(pair, ("amd64", "arm64"))]},
                separators=(",", ":")).encode()
            digest = _digest(body)
            items.append((digest, "manifest", len(body), self.atime(pair[0]) + 1.0))
            refs.extend((digest, self.image_digests[i]) for i in pair)
            yield digest, OCI_INDEX, body
        flush()
        made.manifests, made.indexes = self.images + self.indexes, self.indexes

    def _tag_rows(self, tags: dict[tuple[str, str], list[str]],
                  made: Filled) -> Iterator[tuple]:
        for image, digest in enumerate(self.image_digests):
            upstream, name = self.repository(image)
            tag = f"v{image // self.repositories}"
            tags.setdefault((upstream, name), []).append(tag)
            yield (f"{upstream}/{name}", tag, "index", digest, OCI_MANIFEST,
                   self.image_sizes[image], self.now)
        for number in range(self.tags_in_one):  # the big repository: tags on a few images
            image = (number % 50) * self.repositories % self.images
            tag = f"t{number:05d}"
            tags[("docker.io", BIG)].append(tag)
            yield ("docker.io/" + BIG, tag, "index", self.image_digests[image], OCI_MANIFEST,
                   self.image_sizes[image], self.now)
        made.big_tags = sorted(tags[("docker.io", BIG)])
        made.tags = sum(len(t) for t in tags.values())
        image = next((i for i in range(1, len(self.image_digests))
                      if self.repository(i)[0] == "docker.io"), 0)
        made.name, made.tag = self.repository(image)[1], f"v{image // self.repositories}"
        made.digest = self.image_digests[image]


def _hosted(db: sqlite3.Connection, plan: _Plan, made: Filled, images: int,
            tags_in_one: int) -> None:
    """Two hosted repositories: pushed images are the first `images` image manifests."""
    for name in (HOSTED, HOSTED_BIG):
        db.execute("INSERT INTO hosted_repositories VALUES (?, ?)", (name, plan.now))
    for image in range(min(images, plan.images)):
        digest = plan.image_digests[image]
        for name in (HOSTED, HOSTED_BIG):
            db.execute("INSERT INTO hosted_manifests VALUES (?, ?, ?)",
                       (name, digest, OCI_MANIFEST))
            db.executemany("INSERT OR IGNORE INTO hosted_blobs VALUES (?, ?, ?, ?)",
                           [(name, plan.blob_digest(n), plan.blob_size(n), plan.now)
                            for n in plan.image_children(image)])
        db.execute("INSERT INTO hosted_tags VALUES (?, ?, ?)", (HOSTED, f"{image}.0", digest))
    db.executemany("INSERT INTO hosted_tags VALUES (?, ?, ?)",
                   ((HOSTED_BIG, f"t{n:05d}", plan.image_digests[n % max(images, 1)])
                    for n in range(tags_in_one)))


def _blob_files(root: Path, plan: _Plan, count: int) -> None:
    """Real files for the first `count` blobs (configs): their bytes are what they are named
    by, so only their ledger size differs (the mirror serves the file's own length). They
    and their directories are dated an hour back, before the ledger's agreement time, as
    in a root whose files were all there when it last agreed with the disk."""
    written = set()
    for number in range(min(count, plan.blobs)):
        data = b"synthetic blob %d" % number
        encoded = hashlib.sha256(data).hexdigest()
        path = root / "blobs" / "sha256" / encoded[:2] / encoded
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.update((path, path.parent))
    before = plan.now - 3600
    for path in written:
        os.utime(path, (before, before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="fraction of 1M items / 200k manifests / 50k repositories")
    parser.add_argument("--tags-in-one", type=int, help="default: 10,000 x scale")
    args = parser.parse_args()
    made = fill(args.root, items=int(1_000_000 * args.scale),
                manifests=int(200_000 * args.scale),
                repositories=max(int(50_000 * args.scale), 1),
                tags_in_one=args.tags_in_one if args.tags_in_one is not None
                else int(10_000 * args.scale))
    size = (Path(args.root) / "metadata.sqlite").stat().st_size
    print(f"{made.items} items, {made.manifests} manifests ({made.indexes} indexes), "
          f"{made.refs} refs, {made.tags} tags in {made.repositories} repositories, "
          f"{made.total_bytes / 2**40:.1f} TiB in the ledger; metadata.sqlite "
          f"{size / 2**20:.0f} MiB; {made.seconds:.1f} s")


if __name__ == "__main__":
    main()
