"""`mirror ls` and `mirror du`: what the cache and the hosted repositories hold, and how much.

Read from the metadata store directly, with one pass over its tag records: each names a
cached repository (`<upstream>/<name>`), a tag and the manifest it answers with. A
repository's size is everything its tagged manifests reach — manifests, configs, layers,
each counted once per repository — and its last use is the latest clock among them.
Sizes, references and clocks come from the ledger; content the ledger does not know is
measured from the manifest itself and the blob file. Each digest is looked up once
however many repositories share it, so the cost is the number of tags plus the number of
distinct digests they reach, never repositories times cache. Content shared by two
repositories counts in each, and once in the totals of `du`. `ls` also shows each
repository's verdict under the config's current `[[policy.rules]]` (trust/rules.py): by name
and tag, as a pull would be decided before anything is fetched (platform rules need a
manifest's content and are left to the pull), and, under `[[policy.signatures]]`, each
tag's signature verdict, computed offline from the stored signatures (ops/verdicts.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from ..config import Config, ConfigError
from ..errors import RegistryError
from ..media import references
from ..reference import Router
from ..trust.rules import HOSTED, Rules
from .local import CommandError, Storage, human_size
from .verdicts import ARTIFACT, NOT_REQUIRED, RuleVerdict, SignatureVerdicts

TOP = 10


@dataclass(frozen=True)
class Entry:
    size: int
    atime: float | None   # None: the ledger does not know this digest
    children: tuple[str, ...]


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

    def as_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "key": self.key or None,
                "tags": self.tags, "size": self.size, "last_used": self.last_used,
                "verdict": {"repository": self.verdict, "tags": self.tag_verdicts},
                "signatures": {tag: _signature_json(digest, found) for tag, (digest, found)
                               in self.signatures.items()}}

    async def judge_signatures(self, verdicts: SignatureVerdicts) -> None:
        """Each tag's signature verdicts; a tag is judged by the digest a client accepting
        indexes gets (what cosign signs; a signed index admits the rest)."""
        for tag, classes in sorted(self.tags.items()):
            digest = classes.get("index") or min(classes.values())
            found: list[RuleVerdict] | str = NOT_REQUIRED
            if self.kind == "cached":  # pushed repositories are never checked
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
    """Size, clock and references of a digest, each asked of storage once."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.found: dict[str, Entry | None] = {}

    def __call__(self, digest: str) -> Entry | None:
        """A digest already looked up (by `entry` or `closure`)."""
        return self.found.get(digest)

    async def entry(self, digest: str) -> Entry | None:
        if digest not in self.found:
            self.found[digest] = await self._find(digest)
        return self.found[digest]

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
            return Entry(item.size, item.atime, tuple(children))
        if manifest is not None:
            return Entry(len(manifest[1]), None, tuple(references(manifest[1])))
        size = self.storage.store.size(digest)
        return None if size is None else Entry(size, None, ())

    async def closure(self, roots: set[str]) -> set[str]:
        """The stored digests that `roots` reach (an index's missing platforms are skipped)."""
        found: set[str] = set()
        pending = list(roots)
        while pending:
            digest = pending.pop()
            entry = await self.entry(digest)
            if digest in found or entry is None:
                continue
            found.add(digest)
            pending += entry.children
        return found

    async def measure(self, repository: Repository, roots: set[str]) -> None:
        repository.content = await self.closure(roots)
        entries = [self(d) for d in repository.content]
        repository.size = sum(e.size for e in entries if e is not None)
        clocks = [e.atime for e in entries if e is not None and e.atime is not None]
        repository.last_used = max(clocks, default=None)


async def repositories(config: Config, storage: Storage, lookup: Lookup) -> list[Repository]:
    cached = await _cached(config, storage, lookup)
    hosted = await _hosted(config, storage, lookup)
    return sorted(cached + hosted, key=lambda r: (r.name, r.kind))


async def _cached(config: Config, storage: Storage, lookup: Lookup) -> list[Repository]:
    found: dict[str, Repository] = {}
    for repo_key, tag, accept_class, record in await storage.metadata.tag_records():
        repository = found.setdefault(repo_key, Repository(_client_name(config, repo_key),
                                                           "cached", repo_key))
        repository.tags.setdefault(tag, {})[accept_class] = record.digest
    router = Router(config.upstreams)
    for name in await storage.index.repository_names():  # pulled by digest only: no tags
        try:
            key = router.route(name).key
        except RegistryError:  # a catalog name from an upstream no longer configured
            continue
        found.setdefault(key, Repository(name, "cached", key))
    for repository in found.values():
        await lookup.measure(repository, {d for c in repository.tags.values() for d in c.values()})
    return list(found.values())


def _client_name(config: Config, key: str) -> str:
    """`docker.io/library/alpine` -> `library/alpine`: default-upstream names go unprefixed."""
    for upstream in config.upstreams:
        if key.startswith(upstream.name + "/"):
            return key[len(upstream.name) + 1:] if upstream.default else key
    return key


async def _hosted(config: Config, storage: Storage, lookup: Lookup) -> list[Repository]:
    found = []
    for name in await storage.metadata.hosted_names():
        record = await storage.metadata.hosted(name)
        if record is None:  # deleted since the names were read
            continue
        repository = Repository(name, "hosted",
                                tags={t: {"any": d} for t, d in record.tags.items()})
        await lookup.measure(repository, set(record.manifests) | set(record.blobs))
        found.append(repository)
    return found


def totals(config: Config, storage: Storage, lookup: Lookup,
           found: list[Repository]) -> dict:
    cached = set().union(*(r.content for r in found if r.kind == "cached"))
    hosted = set().union(*(r.content for r in found if r.kind == "hosted"))

    def size(digests: set[str]) -> int:
        return sum(e.size for e in map(lookup, digests) if e is not None)

    # What the budget counts: the ledger, plus whatever it has not recorded.
    unrecorded = {d for d in cached | hosted if (e := lookup(d)) is not None and e.atime is None}
    used = storage.metadata.total() + size(unrecorded)
    budget = config.storage.max_size
    top = sorted(found, key=lambda r: -r.size)[:TOP]
    return {"cached_bytes": size(cached), "hosted_bytes": size(hosted), "used_bytes": used,
            "budget_bytes": budget, "use_ratio": used / budget if budget else None,
            "repositories": len(found),
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
        found = await repositories(config, storage, Lookup(storage))
        for repository in found:
            repository.judge(rules)
            await repository.judge_signatures(verdicts)
        return found
    finally:
        await storage.close()


def du(config: Config, as_json: bool) -> int:
    _, summary = asyncio.run(_gather(config))
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


async def _gather(config: Config) -> tuple[list[Repository], dict]:
    storage = Storage(config)
    try:
        lookup = Lookup(storage)
        found = await repositories(config, storage, lookup)
        return found, totals(config, storage, lookup, found)
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
