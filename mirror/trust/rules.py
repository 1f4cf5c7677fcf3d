"""The pull policy: `[[policy.rules]]` compiled once, and asked on every pull request.

A request is decided from its scope (the upstream's name, or `hosted` for a pushed
repository), the repository name as the mirror normalised it (`alpine` from Docker Hub is
`library/alpine`; no upstream prefix) and its tag, if it has one — before the cache or any
upstream is asked, so a denied name is neither fetched nor served from what is cached.

- Every rule whose `upstream` is the request's scope applies (a rule without `upstream`
  applies to every upstream, not to hosted repositories). The request is denied when any
  applying rule denies it; the first such rule, in file order, is the one named.
- A rule denies when one of its `deny` globs matches, or when it has an `allow` list and
  none of its globs matches. Deny wins over allow.
- A glob is `repository` or `repository:tag`. `*` matches any run of characters, `/`
  included (`myorg/*` matches `myorg/team/app`); `?` matches one character other than `/`.
- A pull by digest (and every blob, tag list and referrers request) has no tag: a `:tag`
  glob in `deny` cannot see it, and one in `allow` admits its repository. Denying a
  repository (a glob without `:`) covers its digests too.
- `platforms` is checked on manifests' content: an index is served when it offers at least
  one allowed platform (its digest must stay intact, so it is never filtered); an image
  manifest whose config names another platform is denied, whichever index led to it.
  Manifests without a platform (signatures, attestations, artifacts) are not platform
  images and pass.

docs/trust.md is the user's version of this paragraph; the tests hold them together.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from ..config import ConfigError
from ..errors import Denied
from ..media import LIST_TYPES
from .platforms import IMAGE_CONFIGS, Platform, offered, parse_platform, platform_of

if TYPE_CHECKING:
    from ..config import Config, PolicyRule
    from ..metrics import Metrics

log = logging.getLogger("mirror")

HOSTED = "hosted"  # the scope of pushed repositories' pulls
RECENT = 20        # denials the status page lists
KNOWN_PLATFORMS = 10_000  # image manifests whose platform is remembered
KNOWN_DECISIONS = 10_000  # (scope, name, tag) decisions remembered; the rules never change

REPOSITORY_GLOB = re.compile(r"[a-z0-9._*?-]+(?:/[a-z0-9._*?-]+)*")
TAG_GLOB = re.compile(r"[A-Za-z0-9._*?-]{1,128}")
@dataclass(frozen=True)
class Glob:
    text: str
    repository: re.Pattern
    tag: re.Pattern | None

    def denies(self, name: str, tag: str | None) -> bool:
        if not self.repository.fullmatch(name):
            return False
        return self.tag is None or (tag is not None and self.tag.fullmatch(tag) is not None)

    def allows(self, name: str, tag: str | None) -> bool:
        if not self.repository.fullmatch(name):
            return False
        return self.tag is None or tag is None or self.tag.fullmatch(tag) is not None


def _pattern(glob: str, one: str) -> re.Pattern:
    return re.compile("".join(".*" if c == "*" else one if c == "?" else re.escape(c)
                              for c in glob))


@dataclass(frozen=True)
class Rule:
    index: int
    scope: str | None  # an upstream's name, HOSTED, or None: every upstream
    allow: tuple[Glob, ...]
    deny: tuple[Glob, ...]
    platforms: tuple[Platform, ...]

    @property
    def label(self) -> str:
        """The metric's `rule` label: "rules[0]"."""
        return f"rules[{self.index}]"

    @property
    def where(self) -> str:
        return f"policy.rules[{self.index}]"

    def applies(self, scope: str) -> bool:
        return self.scope == scope if self.scope is not None else scope != HOSTED

    def refusal(self, name: str, tag: str | None) -> str | None:
        """Why this rule denies the request (`deny "*:latest"`), or None."""
        for glob in self.deny:
            if glob.denies(name, tag):
                return f'deny "{glob.text}"'
        if self.allow and not any(glob.allows(name, tag) for glob in self.allow):
            return "allow " + json.dumps([g.text for g in self.allow]) + " does not match"
        return None

    def describe(self) -> str:
        """One line for the status page."""
        parts = [f"upstream {self.scope}" if self.scope else "every upstream"]
        for key, values in (("allow", [g.text for g in self.allow]),
                            ("deny", [g.text for g in self.deny]),
                            ("platforms", [str(p) for p in self.platforms])):
            if values:
                parts.append(f"{key} {json.dumps(values)}")
        return "; ".join(parts)


class Rules:
    """The compiled `[[policy.rules]]` of a config; building it validates them (load())."""

    def __init__(self, config: Config):
        scopes = {p: u.name for u in config.upstreams for p in u.prefixes}
        if HOSTED in scopes:
            raise ConfigError(f'an upstream is named "{HOSTED}", which [[policy.rules]] uses '
                              "for pushed repositories; rename the upstream")
        libraries = {u.name for u in config.upstreams if u.adds_library}
        self.rules = tuple(_compile(i, rule, scopes, libraries)
                           for i, rule in enumerate(config.policy.rules))
        self._applying: dict[str, tuple[Rule, ...]] = {}

    def applying(self, scope: str) -> tuple[Rule, ...]:
        found = self._applying.get(scope)
        if found is None:
            found = self._applying[scope] = tuple(r for r in self.rules if r.applies(scope))
        return found

    def refusal(self, scope: str, name: str, tag: str | None) -> tuple[Rule, str] | None:
        """The first applying rule that denies (name, tag), and why; None: allowed."""
        for rule in self.applying(scope):
            why = rule.refusal(name, tag)
            if why is not None:
                return rule, why
        return None

    def verdict(self, scope: str, name: str, tag: str | None) -> str:
        """"allowed", or "denied by policy.rules[0] deny ..." (for `mirror ls`)."""
        refused = self.refusal(scope, name, tag)
        return "allowed" if refused is None else f"denied by {refused[0].where} {refused[1]}"


def _compile(index: int, rule: PolicyRule, scopes: dict[str, str],
             libraries: set[str]) -> Rule:
    where = f"policy.rules[{index}]"
    scope = rule.upstream
    if scope is not None and scope != HOSTED:
        if scope not in scopes:
            raise ConfigError(
                f"{where}.upstream: no upstream {scope!r} is configured (configured: "
                f"{', '.join(sorted(set(scopes.values()))) or 'none'}; \"{HOSTED}\" for "
                "pushed repositories)")
        scope = scopes[scope]  # an alias means its upstream
    prefixes = {p + "/" for p, name in scopes.items() if name == scope}
    globs = {}
    for key in ("allow", "deny"):
        globs[key] = tuple(_glob(text, f"{where}.{key}[{i}]", prefixes,
                                 scope in libraries)
                           for i, text in enumerate(getattr(rule, key)))
    platforms = tuple(parse_platform(text, f"{where}.platforms[{i}]")
                      for i, text in enumerate(rule.platforms))
    return Rule(index, scope, globs["allow"], globs["deny"], platforms)


def _glob(text: str, where: str, prefixes: set[str], library: bool) -> Glob:
    repository, colon, tag = text.partition(":")
    if "@" in text:
        raise ConfigError(f"{where}: {text!r} holds a digest; rules match repositories and "
                          "tags (deny the repository, or list the tags to allow)")
    if repository.lower() != repository:
        raise ConfigError(f"{where}: {text!r}: repository names are lower case; write "
                          f"{repository.lower() + colon + tag!r}")
    if REPOSITORY_GLOB.fullmatch(repository) is None:
        raise ConfigError(f"{where}: {text!r} is not a repository glob: lower-case names "
                          "separated by /, with * and ? as the only wildcards "
                          "(like \"myorg/*\" or \"*:latest\")")
    if colon and TAG_GLOB.fullmatch(tag) is None:
        raise ConfigError(f"{where}: {text!r} has no valid tag glob after the colon: letters, "
                          "digits, . _ - and the wildcards * and ? (like \"*:latest\" or "
                          "\"library/alpine:3.*\")")
    for prefix in prefixes:
        if repository.startswith(prefix):
            raise ConfigError(f"{where}: {text!r}: names are matched without the upstream's "
                              f"name; write {text[len(prefix):]!r}")
    if library and "/" not in repository and "*" not in repository:
        raise ConfigError(f"{where}: {text!r}: Docker Hub's one-word names are matched as "
                          f"library/<name>; write 'library/{text}'")
    return Glob(text, _pattern(repository, "[^/]"),
                _pattern(tag, ".") if colon else None)


@dataclass(frozen=True)
class Denial:
    """One refused request, for the status page."""

    at: float
    client: str
    subject: str  # name:tag, name@digest or name
    rule: str     # policy.rules[0] deny "*:latest"


class PullPolicy:
    """The rules of one running mirror, with their counts and the latest denials."""

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.rules = Rules(config)
        self.recent: deque[Denial] = deque(maxlen=RECENT)
        self._platforms: dict[str, tuple[bool, tuple[Platform, ...]]] = {}
        # A warm manifest GET costs a dict lookup here, not ten rules' regexes (~70 us).
        self._decisions: dict[tuple[str, str, str | None], tuple[Rule, str] | None] = {}
        # Bound series, created at zero so rate() sees the first decision of each rule.
        self._counts = {}
        self._allowed_series: dict[str, tuple] = {}
        if metrics is not None:
            for label in ["none", *(r.label for r in self.rules.rules)]:
                for decision in ("allowed", "denied"):
                    self._counts[label, decision] = \
                        metrics.policy_decisions.labels(label, decision)

    @property
    def active(self) -> bool:
        return bool(self.rules.rules)

    def check(self, scope: str, name: str, reference: str | None, client: str | None) -> None:
        """Raise Denied unless the rules let (name, reference) be pulled."""
        applying = self.rules.applying(scope)
        if not applying:
            self._count("none", "allowed")
            return
        tag = reference if reference is not None and ":" not in reference else None
        key = (scope, name, tag)
        try:
            refused = self._decisions[key]
        except KeyError:
            if len(self._decisions) >= KNOWN_DECISIONS:
                self._decisions.clear()
            refused = self._decisions[key] = self.rules.refusal(scope, name, tag)
        if refused is not None:
            self._deny(*refused, scope, name, reference, client)
        for series in self._allowed(scope, applying):
            series.inc()

    async def check_platform(self, scope: str, name: str, reference: str, digest: str,
                             media_type: str, body: bytes,
                             read_config: Callable[[str], Awaitable[bytes]],
                             client: str | None) -> None:
        """Raise Denied when an applying rule's platforms exclude this manifest's."""
        rules = [r for r in self.rules.applying(scope) if r.platforms]
        if not rules:
            return
        is_index, platforms = await self._facts(digest, media_type, body, read_config)
        if not platforms:
            return  # no platform image (an artifact, a signature): nothing to judge
        for rule in rules:
            if not any(a.covers(p) for a in rule.platforms for p in platforms):
                allowed = json.dumps([str(p) for p in rule.platforms])
                why = f"offered none of {', '.join(map(str, platforms))}" if is_index \
                    else f"excludes {platforms[0]}"
                self._deny(rule, f"platforms {allowed} {why}", scope, name, reference, client)

    async def _facts(self, digest: str, media_type: str, body: bytes,
                     read_config: Callable[[str], Awaitable[bytes]]
                     ) -> tuple[bool, tuple[Platform, ...]]:
        """(is an index, the platforms it offers or the image is), once per digest: a warm
        GET parses nothing."""
        found = self._platforms.get(digest)
        if found is not None:
            return found
        try:
            document = json.loads(body)
        except ValueError:  # not JSON: no platform to judge (the client refuses it anyway)
            document = None
        if not isinstance(document, dict):
            found = (False, ())
        elif media_type in LIST_TYPES or isinstance(document.get("manifests"), list):
            found = (True, tuple(offered(document)))
        elif document.get("schemaVersion") == 1:  # schema1 names its architecture itself
            platform = platform_of({"os": "linux", "architecture": document.get("architecture")})
            found = (False, (platform,) if platform else ())
        else:
            platform = None
            config = document.get("config")
            if isinstance(config, dict) and isinstance(config.get("digest"), str) and \
                    config.get("mediaType") in IMAGE_CONFIGS:
                try:
                    platform = platform_of(json.loads(await read_config(config["digest"])))
                except ValueError:  # an unreadable config names no platform
                    platform = None
            found = (False, (platform,) if platform else ())
        if len(self._platforms) >= KNOWN_PLATFORMS:
            self._platforms.clear()
        self._platforms[digest] = found
        return found

    def _deny(self, rule: Rule, why: str, scope: str, name: str, reference: str | None,
              client: str | None) -> None:
        self._count(rule.label, "denied")
        subject = name if scope == HOSTED else f"{scope}/{name}"
        shown = subject if reference is None else \
            f"{subject}{'@' if ':' in reference else ':'}{reference}"
        self.recent.appendleft(Denial(time.time(), client or "-", shown, f"{rule.where} {why}"))
        # containerd shows only "403 Forbidden" (its HEAD has no body): the reason is here.
        log.info("denied %s to %s: %s %s", shown, client or "-", rule.where, why)
        raise Denied(f"{rule.where} {why}: {shown} may not be pulled through this mirror; "
                     f"pull an image the rules allow, or ask its operators to change "
                     f"{rule.where}", detail={"rule": rule.label, "name": name,
                                              "reference": reference})

    def _allowed(self, scope: str, applying: tuple[Rule, ...]) -> tuple:
        """The bound "allowed" series of the rules applying to `scope` (a few scopes)."""
        found = self._allowed_series.get(scope)
        if found is None:
            found = self._allowed_series[scope] = tuple(
                self._counts[r.label, "allowed"] for r in applying
                if (r.label, "allowed") in self._counts)
        return found

    def _count(self, label: str, decision: str) -> None:
        series = self._counts.get((label, decision))
        if series is not None:
            series.inc()
