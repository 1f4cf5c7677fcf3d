"""What the cache and the hosted repositories hold, and how much: `mirror ls`, `mirror du` and
the server's cache view (api/browse.py), all built by one `Inventory`.

An inventory reads the metadata store a page at a time, in name order: the names of one page
(the catalog, the tag records' repositories and the hosted repositories, each through
`Metadata.*_page`, merged), then that page's tag records and hosted records, then what those
reach. So the cache view's page costs the same at the first and the last of 50,000
repositories, and `ls` is every page in turn. A repository's size is everything its tagged
manifests reach — manifests, configs, layers, each counted once per repository — and its
last use is the latest clock among them. Sizes, references, clocks and pins come from the
ledger; content the ledger does not know is measured from the manifest itself and the blob
file. Each digest is looked up once per inventory however many repositories share it, and
a page's digests a level at a time (its manifests, then what they refer to), each level in
one read. Content shared by two repositories counts in each, and once in the totals of
`du`. `ls` and the cache view also show each tagged manifest (media type, the bytes it
reaches, an index's platforms, its pin), each repository's verdict under the config's
current `[[policy.rules]]` (trust/rules.py): by name and tag, as a pull would be decided
before anything is fetched (platform rules need a manifest's content and are left to the
pull), and, under `[[policy.signatures]]`, each tag's signature verdict, computed offline
from the stored signatures (ops/verdicts.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from ..config import Config, ConfigError
from ..errors import RegistryError
from ..media import DIGEST, references
from ..reference import Router
from ..storage.blobs import BlobStore
from ..storage.index import Index
from ..storage.metadata import Metadata
from ..trust.rules import HOSTED, Rules
from .local import CommandError, Storage, human_size
from .verdicts import ARTIFACT, NOT_REQUIRED, RuleVerdict, SignatureVerdicts

TOP = 10
PAGE = 50      # repositories per page of the cache view
BATCH = 1000   # repositories per page when `ls` and `du` read them all


class Stored(Protocol):
    """What an inventory reads: ops/local.Storage in a command, the server's own parts in
    the cache view."""

    metadata: Metadata
    index: Index
    store: BlobStore


@dataclass(frozen=True)
class Entry:
    size: int
    atime: float | None   # None: the ledger does not know this digest
    children: tuple[str, ...]
    pinned: bool = False


@dataclass(frozen=True)
class Cursor:
    """A position in the listing, which is in (name, kind) order: after `kind` `name`
    (after every repository of that name unless kind is "cached"). Cursor() is the start."""

    name: str = ""
    kind: str = "hosted"


@dataclass(frozen=True)
class Listed:
    """One repository of a page of names, before anything of it is read."""

    name: str
    kind: str       # "cached" or "hosted"
    key: str = ""   # <upstream>/<name> for cached ones


@dataclass
class Repository:
    name: str              # as clients pull it
    kind: str              # "cached" or "hosted"
    key: str = ""          # <upstream>/<name> for cached ones
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # tag -> {class: digest}
    content: set[str] = field(default_factory=set)
    size: int = 0
    last_used: float | None = None
    # "allowed" or "denied by policy.rules[0] ...", for the repository and each tag.
    verdict: str = "allowed"
    tag_verdicts: dict[str, str] = field(default_factory=dict)
    # Per tag: each applying signature rule's verdict, NOT_REQUIRED or ARTIFACT.
    signatures: dict[str, tuple[str, list[RuleVerdict] | str]] = field(default_factory=dict)
    # Each tagged (or pushed) manifest: media type, size reached, platforms, pinned.
    manifests: dict[str, dict] = field(default_factory=dict)
    pins: list[str] = field(default_factory=list)  # pinned digests of its content

    @property
    def upstream(self) -> str | None:
        return self.key.split("/", 1)[0] if self.kind == "cached" else None

    def as_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "key": self.key or None,
                "tags": self.tags, "size": self.size, "last_used": self.last_used,
                "verdict": {"repository": self.verdict, "tags": self.tag_verdicts},
                "signatures": {tag: _signature_json(digest, found) for tag, (digest, found)
                               in self.signatures.items()},
                "manifests": self.manifests, "pins": self.pins}

    async def judge_signatures(self, verdicts: SignatureVerdicts | None) -> None:
        """Each tag's signature verdicts; a tag is judged by the digest a client accepting
        indexes gets (what cosign signs; a signed index admits the rest). No `verdicts`:
        no signature rules, nothing required."""
        for tag, classes in sorted(self.tags.items()):
            digest = classes.get("index") or min(classes.values())
            found: list[RuleVerdict] | str = NOT_REQUIRED
            if self.kind == "cached" and verdicts is not None:  # pushed ones: never checked
                found = await verdicts.judge(self.key, tag, digest)
            self.signatures[tag] = (digest, found)

    def signature_column(self) -> str:
        """`not required`, one verdict for every tag, or `1, 2: signed (...); 3: ...`."""
        shown: dict[str, list[str]] = {}
        for tag, (_, found) in self.signatures.items():
            if found != ARTIFACT:
                text = found if isinstance(found, str) else " + ".join(map(str, found))
                shown.setdefault(text, []).append(tag)
        if not shown:  # no tags, or only signatures' own
            return "-"
        if len(shown) == 1:
            return next(iter(shown))
        return "; ".join(f"{', '.join(tags)}: {text}" for text, tags in shown.items())

    def judge(self, rules: Rules) -> None:
        """The verdicts of the current rules: by digest (the repository) and by tag."""
        scope, name = (HOSTED, self.name) if self.kind == "hosted" else self.key.split("/", 1)
        self.verdict = rules.verdict(scope, name, None)
        self.tag_verdicts = {tag: rules.verdict(scope, name, tag) for tag in sorted(self.tags)}

    def verdict_column(self) -> str:
        """"allowed", "denied (rules[0])" or "tags denied: latest (rules[0])"."""
        if self.verdict != "allowed":
            return f"denied ({_rule(self.verdict)})"
        denied = [f"{tag} ({_rule(v)})" for tag, v in self.tag_verdicts.items() if v != "allowed"]
        return "allowed" if not denied else "tags denied: " + ", ".join(denied)


def _signature_json(digest: str, found: list[RuleVerdict] | str) -> dict:
    """`{"digest", "verdict", "rules"}`: the verdict is the first rule's that is not
    `signed` (what a pull would be refused or warned for), or `signed`."""
    if isinstance(found, str):
        return {"digest": digest, "verdict": found, "rules": []}
    status = next((v.status for v in found if v.status != "signed"), "signed")
    return {"digest": digest, "verdict": status, "rules": [v.as_json() for v in found]}


def _rule(verdict: str) -> str:
    """"denied by policy.rules[0] deny ..." -> "rules[0]"."""
    return verdict.split()[2].removeprefix("policy.")


class Lookup:
    """Size, clock, pin and references of a digest, each asked of storage once."""

    def __init__(self, storage: Stored):
        self.storage = storage
        self.found: dict[str, Entry | None] = {}
        self.manifests: dict[str, tuple[str, bytes] | None] = {}  # for `describe`

    def __call__(self, digest: str) -> Entry | None:
        """A digest already looked up (by `entry` or `closure`)."""
        return self.found.get(digest)

    async def entry(self, digest: str) -> Entry | None:
        if digest not in self.found:
            await self.load([digest])
        return self.found[digest]

    async def load(self, digests: Iterable[str]) -> None:
        """Look up the digests not looked up yet: the ledger's in one read for them all;
        what it lacks (or a manifest it has no references of) one by one."""
        wanted = {d for d in digests if d not in self.found}
        known = await self.storage.metadata.ledger_entries(wanted) if wanted else {}
        for digest in wanted:
            item, children = known.get(digest, (None, []))
            if item is not None and (children or item.kind != "manifest"):
                self.found[digest] = Entry(item.size, item.atime, tuple(children), item.pinned)
            else:
                self.found[digest] = await self._find(digest)

    async def _find(self, digest: str) -> Entry | None:
        metadata = self.storage.metadata
        item = await metadata.item(digest)
        manifest = None
        if item is None or item.kind == "manifest":
            manifest = await self.storage.index.manifest(digest)
        if item is not None:
            children = await metadata.children(digest) if item.kind == "manifest" else []
            if manifest is not None and not children:
                children = references(manifest[1])
            return Entry(item.size, item.atime, tuple(children), item.pinned)
        if manifest is not None:
            return Entry(len(manifest[1]), None, tuple(references(manifest[1])))
        size = self.storage.store.size(digest)
        return None if size is None else Entry(size, None, ())

    async def closure(self, roots: set[str]) -> set[str]:
        """The stored digests that `roots` reach (an index's missing platforms are skipped),
        read a level at a time: an index, its manifests, their blobs."""
        found: set[str] = set()
        level = set(roots)
        while level:
            await self.load(level)
            reached = {d for d in level if self.found[d] is not None}
            found |= reached
            level = {c for d in reached for c in self.found[d].children} - found
        return found

    def size(self, digests: set[str]) -> int:
        return sum(e.size for e in map(self, digests) if e is not None)

    async def measure(self, repository: Repository, roots: set[str]) -> None:
        repository.content = await self.closure(roots)
        entries = [self(d) for d in repository.content]
        repository.size = self.size(repository.content)
        clocks = [e.atime for e in entries if e is not None and e.atime is not None]
        repository.last_used = max(clocks, default=None)

    async def describe(self, digest: str) -> dict:
        """A manifest as `ls --json` and the cache view show it: its media type (None when
        it is not stored), the stored bytes it reaches, its platforms, whether it is pinned."""
        entry = await self.entry(digest)
        if digest not in self.manifests:
            await self.read_manifests([digest])
        found = self.manifests[digest]
        return {"media_type": found[0] if found else None,
                "size": self.size(await self.closure({digest})),
                "platforms": await self._platforms(*found) if found else [],
                "pinned": bool(entry and entry.pinned)}

    async def read_manifests(self, digests: Iterable[str]) -> None:
        """Read these manifests, in one read of the metadata store (what it lacks through
        the index: with S3, the object store's copy)."""
        wanted = {d for d in digests if d not in self.manifests}
        found = await self.storage.metadata.manifests_of(wanted) if wanted else {}
        for digest in wanted:
            self.manifests[digest] = found.get(digest) or \
                await self.storage.index.manifest(digest)

    async def _platforms(self, media_type: str, body: bytes) -> list[dict]:
        """An index's children's platforms, each saying whether that child is stored. (An
        image's own would need its config blob read: not for a page of hundreds.)"""
        children = _document(body).get("manifests")
        if not isinstance(children, list):
            return []
        found = []
        for child in children:
            if isinstance(child, dict) and isinstance(child.get("platform"), dict) and \
                    isinstance(child.get("digest"), str) and DIGEST.fullmatch(child["digest"]):
                found.append({"platform": _platform(child["platform"]), "digest": child["digest"],
                              "stored": await self.entry(child["digest"]) is not None})
        return found


def _document(data: bytes) -> dict:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return document if isinstance(document, dict) else {}


def _platform(fields: dict) -> str:
    """`linux/arm64/v8` from a descriptor's platform."""
    parts = [fields.get(k) for k in ("os", "architecture", "variant")]
    return "/".join(p for p in parts if isinstance(p, str) and p)


@dataclass
class Page:
    repositories: list[Repository]
    next: Cursor | None  # None: this was the last page


class Inventory:
    """The repositories of one storage, a page at a time, each built alike for `ls`, `du`
    and the cache view. Without `rules` nothing is judged and no manifest is described
    (`du` wants sizes only)."""

    def __init__(self, config: Config, storage: Stored, rules: Rules | None = None,
                 verdicts: SignatureVerdicts | None = None):
        self.config = config
        self.storage = storage
        self.rules = rules
        self.verdicts = verdicts
        self.router = Router(config.upstreams)
        self.lookup = Lookup(storage)

    async def everything(self) -> list[Repository]:
        found: list[Repository] = []
        cursor: Cursor | None = Cursor()
        while cursor is not None:
            page = await self.page(cursor, BATCH)
            found += page.repositories
            cursor = page.next
        return found

    async def page(self, after: Cursor = Cursor(), limit: int = PAGE, contains: str = "",
                   source: str | None = None) -> Page:
        """Up to `limit` repositories after `after` whose name holds `contains`, from
        `source` (an upstream's name, or "hosted") or from anywhere."""
        listed: list[Listed] = []
        position: Cursor | None = after
        while position is not None and len(listed) <= limit:
            batch, position = await self._names(position, limit + 1, contains, source)
            listed += batch
        shown = listed[:limit]
        more = len(listed) > limit or position is not None
        return Page(await self._build(shown),
                    Cursor(shown[-1].name, shown[-1].kind) if shown and more else None)

    async def named(self, name: str) -> list[Repository]:
        """The repositories called `name` (cached, hosted, or one of each), as a page
        would list them."""
        metadata = self.storage.metadata
        default = self.router.default
        prefix = default.name + "/" if default is not None else ""
        # Its tag records' key: the default upstream's, or (not under it) the name itself.
        keys = [prefix + name] if default is not None else []
        if not (prefix and name.startswith(prefix)):
            keys.append(name)
        tags = await metadata.repository_tags(keys)
        listed = [Listed(name, "cached", key) for key in keys if tags[key]][:1]
        if not listed and await metadata.has_repository(name):
            listed += [entry for entry in [await self._catalogued(name)] if entry is not None]
        if await metadata.is_hosted(name):
            listed.append(Listed(name, "hosted"))
        return await self._build(listed)

    async def _names(self, after: Cursor, count: int, contains: str,
                     source: str | None) -> tuple[list[Listed], Cursor | None]:
        """The repositories after `after`, in order, up to a bound every source has been
        read to (each source is read `count` names at a time), and the cursor to go on
        from (None: every source is exhausted)."""
        sources = await self._sources(after, count, contains, source)
        full = [names[-1] for names, _ in sources if len(names) >= count]
        bound = min(full) if full else None
        found: dict[tuple[str, str], Listed] = {}
        for _, listed in sources:  # a tag record's key before the catalog's (as ls did)
            for entry in listed:
                if bound is None or entry.name <= bound:
                    found.setdefault((entry.name, entry.kind), entry)
        batch = [found[position] for position in sorted(found)]
        return batch, None if bound is None else Cursor(bound, "hosted")

    async def _sources(self, after: Cursor, count: int, contains: str,
                       source: str | None) -> list[tuple[list[str], list[Listed]]]:
        """Each source's next `count` names after `after` (what bounds the merge) and the
        repositories they list: the tag records (the default upstream's without its prefix,
        then every other key), the catalog and the hosted names; under a `source` (an
        upstream's name or "hosted") its own alone. The default upstream's catalog names
        have no prefix to find them by, so under its name the catalog is not read: a
        repository pulled only by digest (no tags) is listed without a filter only."""
        metadata = self.storage.metadata
        default = self.router.default
        prefix = default.name + "/" if default is not None else ""
        found: list[tuple[list[str], list[Listed]]] = []
        if default is not None and source in (None, default.name):
            names = await metadata.tagged_page(prefix, after.name, count, contains)
            found.append((names, [Listed(n, "cached", prefix + n) for n in names]))
        if source is None:
            names = await metadata.tagged_page("", after.name, count, contains,
                                               exclude=prefix or None)
            found.append((names, [Listed(n, "cached", n) for n in names]))
            names = await metadata.catalog_page(after.name, count, contains)
            found.append((names, [listed for n in names
                                  if (listed := await self._catalogued(n)) is not None]))
        elif source != "hosted" and source != (default.name if default else None):
            found += await self._upstream_sources(source + "/", after, count, contains)
        if source in (None, "hosted"):
            names = await metadata.hosted_page(after.name, count, contains)
            hosted = [Listed(n, "hosted") for n in names]
            if after.kind == "cached" and contains in after.name and \
                    await metadata.is_hosted(after.name):  # the same name, hosted: after it
                hosted.insert(0, Listed(after.name, "hosted"))
            found.append((names, hosted))
        return found

    async def _upstream_sources(self, prefix: str, after: Cursor, count: int,
                                contains: str) -> list[tuple[list[str], list[Listed]]]:
        """An upstream's other than the default: its tag records and catalog names, which
        all start with `<upstream>/`."""
        end = _above(prefix)
        if after.name >= end:
            return []
        metadata = self.storage.metadata
        start = after.name[len(prefix):] if after.name.startswith(prefix) else ""
        # The store matches `contains` after the prefix; one that may span it ("io/te" in
        # quay.io/team) is matched here instead.
        spans = any(contains.startswith(prefix[i:]) for i in range(len(prefix)))
        names = [prefix + key for key in await metadata.tagged_page(
            prefix, start, count, "" if spans else contains)]
        tagged = [Listed(n, "cached", n) for n in names if contains in n]
        # Read from the range's start; past its end a source is exhausted (shorter list).
        catalog = [n for n in await metadata.catalog_page(max(after.name, prefix), count,
                                                          contains) if n < end]
        return [(names, tagged), (catalog, [listed for n in catalog if (
            listed := await self._catalogued(n)) is not None])]

    async def _catalogued(self, name: str) -> Listed | None:
        """A catalog name's repository (pulled by digest only, it has no tag records); None
        for one from an upstream no longer configured, or a name the tag records list
        under another spelling (a catalog older than `library/`)."""
        try:
            key = self.router.route(name).key
        except RegistryError:
            return None
        if _client_name(self.config, key) != name and \
                (await self.storage.metadata.repository_tags([key]))[key]:
            return None
        return Listed(name, "cached", key)

    async def _build(self, shown: list[Listed]) -> list[Repository]:
        """The page's repositories: its tag records in one read, its hosted records, then
        what they reach."""
        metadata = self.storage.metadata
        tags = await metadata.repository_tags([e.key for e in shown if e.kind == "cached"])
        found: list[tuple[Repository, set[str], set[str]]] = []
        for entry in shown:
            repository = Repository(entry.name, entry.kind, entry.key)
            if entry.kind == "cached":
                for tag, accept_class, record in tags.get(entry.key, []):
                    repository.tags.setdefault(tag, {})[accept_class] = record.digest
                roots = manifests = {d for c in repository.tags.values() for d in c.values()}
            else:
                record = await metadata.hosted(entry.name)
                if record is None:  # deleted since the names were read
                    continue
                repository.tags = {t: {"any": d} for t, d in record.tags.items()}
                roots, manifests = set(record.manifests) | set(record.blobs), set(record.manifests)
            found.append((repository, roots, manifests))
        # What the page reaches, a level at a time for all of it, before any one is measured.
        await self.lookup.closure(set().union(*(roots for _, roots, _ in found)))
        if self.rules is not None:
            await self.lookup.read_manifests(set().union(*(m for _, _, m in found)))
        for repository, roots, manifests in found:
            await self._complete(repository, roots, manifests)
        return [repository for repository, _, _ in found]

    async def _complete(self, repository: Repository, roots: set[str],
                        manifests: set[str]) -> None:
        """Everything `as_json` says of a repository: size, last use, pins, manifests,
        the rules' verdicts and the signatures'."""
        await self.lookup.measure(repository, roots)
        if self.rules is None:
            return
        for digest in sorted(manifests):
            repository.manifests[digest] = await self.lookup.describe(digest)
        repository.pins = sorted(d for d in repository.content
                                 if (e := self.lookup(d)) is not None and e.pinned)
        repository.judge(self.rules)
        await repository.judge_signatures(self.verdicts)


def _client_name(config: Config, key: str) -> str:
    """`docker.io/library/alpine` -> `library/alpine`: default-upstream names go unprefixed."""
    for upstream in config.upstreams:
        if key.startswith(upstream.name + "/"):
            return key[len(upstream.name) + 1:] if upstream.default else key
    return key


def _above(prefix: str) -> str:
    """The least string after every string that starts with `prefix`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def totals(config: Config, storage: Stored, lookup: Lookup,
           found: list[Repository]) -> dict:
    cached = set().union(*(r.content for r in found if r.kind == "cached"))
    hosted = set().union(*(r.content for r in found if r.kind == "hosted"))
    # What the budget counts: the ledger, plus whatever it has not recorded.
    unrecorded = {d for d in cached | hosted if (e := lookup(d)) is not None and e.atime is None}
    used = storage.metadata.total() + lookup.size(unrecorded)
    budget = config.storage.max_size
    top = sorted(found, key=lambda r: -r.size)[:TOP]
    return {"cached_bytes": lookup.size(cached), "hosted_bytes": lookup.size(hosted),
            "used_bytes": used, "budget_bytes": budget,
            "use_ratio": used / budget if budget else None, "repositories": len(found),
            "top": [{"name": r.name, "kind": r.kind, "size": r.size} for r in top]}


def ls(config: Config, as_json: bool) -> int:
    found = asyncio.run(_listing(config))
    if as_json:
        print(json.dumps({"repositories": [r.as_json() for r in found]}, indent=2))
        return 0
    rows = [("REPOSITORY", "KIND", "SIZE", "LAST USE", "VERDICT", "TAGS", "SIGNATURES")]
    rows += [(r.name, r.kind, human_size(r.size), _when(r.last_used), r.verdict_column(),
              _tags(r), r.signature_column()) for r in found]
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:6], widths, strict=True)]
        print("  ".join([*cells, row[6]]))
    return 0


async def _listing(config: Config) -> list[Repository]:
    """The repositories with the rules' verdicts and, under signature rules, each tag's."""
    rules = Rules(config)
    storage = Storage(config)
    try:
        try:  # the server's key loading: a bad key file stops `ls` as it stops `serve`
            verdicts = SignatureVerdicts(config, storage)
        except ConfigError as error:
            raise CommandError(f"config error: {error}") from None
        return await Inventory(config, storage, rules, verdicts).everything()
    finally:
        await storage.close()


def du(config: Config, as_json: bool) -> int:
    summary = asyncio.run(_gather(config))
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    budget = summary["budget_bytes"]
    print(f"cached  {human_size(summary['cached_bytes'])}")
    print(f"hosted  {human_size(summary['hosted_bytes'])}")
    print(f"used    {human_size(summary['used_bytes'])} " + (
        f"of a {human_size(budget)} budget ({100 * summary['use_ratio']:.1f}%)" if budget
        else "(no budget: storage.max_size is not set)"))
    if summary["top"]:
        print("largest repositories:")
        width = max(len(r["name"]) for r in summary["top"])
        for r in summary["top"]:
            print(f"  {r['name'].ljust(width)}  {r['kind']:6}  {human_size(r['size'])}")
    return 0


async def _gather(config: Config) -> dict:
    storage = Storage(config)
    try:
        inventory = Inventory(config, storage)
        found = await inventory.everything()
        return totals(config, storage, inventory.lookup, found)
    finally:
        await storage.close()


def _tags(repository: Repository) -> str:
    """Tags; one that answers clients accepting indexes and clients accepting none with
    different manifests shows both digests (the JSON always has every class)."""
    shown = []
    for tag, classes in sorted(repository.tags.items()):
        if len(set(classes.values())) == 1:
            shown.append(tag)
        else:
            shown.append(f"{tag} (" + ", ".join(f"{c}: {d[:19]}" for c, d in
                                                 sorted(classes.items())) + ")")
    return ", ".join(shown)


def _when(clock: float | None) -> str:
    return "-" if clock is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(clock))
