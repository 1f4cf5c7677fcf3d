"""Signature enforcement on the request path: `[[policy.signatures]]` asked on manifest pulls.

`Signatures(config, metrics)` loads every rule's keys (and, for keyless identities, the
trusted root) at start, so a bad file stops `mirror serve` with a `ConfigError` naming it.
`check(route, reference, manifest, proxy, client)` runs on every manifest GET and HEAD of an
upstream repository that a rule's `upstream` and `repositories` match (after the pull rules
allowed it), before the client gets the manifest:

- The manifest's digest is verified by cosign.py through `ProxyFetch`, which reads the
  signature tag, the referrers and their blobs through the mirror's own cache: they are
  fetched once, stored, and served to clients as well (Kyverno or `policy.json` on the
  nodes can check again when the upstream is gone).
- Verdicts are kept by (rule, digest) in a bounded LRU; a verification's fetches run once
  per digest under concurrency (cache/flights.py). A moved tag is a new digest, checked on
  its own. `unsigned` and `invalid` verdicts are kept for the upstream's `tag_ttl` only,
  so a signature pushed later is seen without a restart.
- An index that verifies admits its child manifests (their digests are recorded); a child
  asked for by digest whose index was never seen must be signed itself.
- Signature artifacts are not judged (else nothing could verify): a HEAD of cosign's tags
  (`sha256-<hex>.sig`, `.att`, `.sbom`, the referrers tag schema `sha256-<hex>`), and any
  manifest whose layers are all signatures, attestations or SBOMs (nothing runnable); a GET
  by such a tag must have such content too (or be an index, for `sha256-<hex>`).
- Modes: `enforce` refuses unsigned or invalid with 403 DENIED (the verdict's reason and
  the rule); `warn` serves, logs once per digest and counts; `audit` counts only. A
  verification that cannot finish (the upstream is down) is 503 under `enforce`.

Every judged request counts in `mirror_signature_verdicts_total{rule, verdict, mode}`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..cache.flights import Flights
from ..config import ConfigError
from ..errors import BlobUnknown, Denied, ManifestUnknown, RegistryError, Unavailable
from ..media import LIST_TYPES
from .bundle import BUNDLE_MEDIA_TYPES
from .cosign import SIMPLE_SIGNING_MEDIA_TYPE, Verdict, verify
from .formats import MAX_DOCUMENT, Malformed, json_object, one_of
from .keyless import Identity, Keyless, KeylessNotConfigured
from .keys import Key, KeyFileError, load_key
from .rules import HOSTED, RECENT, Denial, Glob, _glob

if TYPE_CHECKING:
    from ..cache.proxy import Manifest, Proxy
    from ..config import Config, PolicySignature
    from ..metrics import Metrics
    from ..reference import Route

log = logging.getLogger("mirror")

MODES = ("enforce", "warn", "audit")
VERDICTS = ("signed", "unsigned", "invalid")
KNOWN_VERDICTS = 10_000  # (rule, digest) verdicts and admitted children kept, LRU
# cosign's tags: signatures, attestations, SBOMs; without a suffix the referrers tag schema.
SIGNATURE_TAG = re.compile(r"sha256-[a-f0-9]{64}(\.sig|\.att|\.sbom)?")
# Layers that hold statements about an image, never a filesystem: a manifest made only of
# these cannot be run, so it is a signature artifact, not an image to judge.
ARTIFACT_LAYERS = frozenset({
    SIMPLE_SIGNING_MEDIA_TYPE, *BUNDLE_MEDIA_TYPES,
    "application/vnd.dsse.envelope.v1+json", "application/vnd.in-toto+json",
    "application/spdx+json", "text/spdx", "text/spdx+json", "text/spdx+xml",
    "application/vnd.cyclonedx", "application/vnd.cyclonedx+json",
    "application/vnd.cyclonedx+xml", "application/vnd.syft+json",
})


@dataclass(frozen=True)
class SignatureRule:
    index: int
    scope: str | None  # an upstream's name, or None: every upstream
    repositories: tuple[Glob, ...]
    mode: str
    key_files: tuple[str, ...]
    identities: tuple[Identity, ...]

    @property
    def label(self) -> str:
        """The metric's `rule` label: "signatures[0]"."""
        return f"signatures[{self.index}]"

    @property
    def where(self) -> str:
        return f"policy.signatures[{self.index}]"

    def applies(self, scope: str, name: str) -> bool:
        if self.scope is not None and self.scope != scope:
            return False
        return not self.repositories or any(g.allows(name, None) for g in self.repositories)

    def describe(self) -> str:
        """One line for the status page."""
        parts = [f"upstream {self.scope}" if self.scope else "every upstream",
                 "repositories " + (", ".join(g.text for g in self.repositories) or "all")]
        parts += [f"key {path}" for path in self.key_files]
        parts += [f"identity {identity}" for identity in self.identities]
        return "; ".join(parts) + f"; {self.mode}"


def compile_rules(config: Config) -> tuple[SignatureRule, ...]:
    """Check `[[policy.signatures]]` without reading files (config.load calls this)."""
    scopes = {p: u.name for u in config.upstreams for p in u.prefixes}
    libraries = {u.name for u in config.upstreams if u.adds_library}
    return tuple(_compile(i, rule, scopes, libraries, config.policy.trusted_root)
                 for i, rule in enumerate(config.policy.signatures))


def _compile(index: int, rule: PolicySignature, scopes: dict[str, str], libraries: set[str],
             trusted_root: str | None) -> SignatureRule:
    where = f"policy.signatures[{index}]"
    scope = rule.upstream
    if scope == HOSTED:
        raise ConfigError(f"{where}.upstream: pushed repositories are not checked for "
                          "signatures (their pushers are [access]'s business)")
    if scope is not None:
        if scope not in scopes:
            raise ConfigError(f"{where}.upstream: no upstream {scope!r} is configured "
                              f"(configured: {', '.join(sorted(set(scopes.values()))) or 'none'})")
        scope = scopes[scope]
    prefixes = {p + "/" for p, name in scopes.items() if name == scope}
    globs = []
    for i, text in enumerate(rule.repositories):
        if ":" in text:
            raise ConfigError(f"{where}.repositories[{i}]: {text!r} has a tag; signatures "
                              "are checked per repository (and digest), never per tag")
        globs.append(_glob(text, f"{where}.repositories[{i}]", prefixes, scope in libraries))
    if rule.mode not in MODES:
        raise ConfigError(f"{where}.mode must be \"enforce\", \"warn\" or \"audit\", "
                          f"not {rule.mode!r}")
    files = ((rule.key,) if rule.key else ()) + rule.keys
    if not files and not rule.identities:
        raise ConfigError(f"{where} needs key, keys or identities: what would a signature "
                          "be checked against?")
    if rule.identities and trusted_root is None:
        raise ConfigError(f"{where}.identities need policy.trusted_root (Sigstore's "
                          "trusted_root.json) to check keyless signatures offline")
    return SignatureRule(index, scope, tuple(globs), rule.mode, files,
                         tuple(Identity(identity, issuer) for identity, issuer in rule.identities))


class Signatures:
    """The signature rules of one running mirror: their keys, verdicts and counts."""

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.rules = compile_rules(config)
        self._keys: dict[int, tuple[Key, ...]] = {}
        self._keyless: dict[int, Keyless | None] = {}
        for rule in self.rules:
            try:
                self._keys[rule.index] = tuple(load_key(path) for path in rule.key_files)
            except KeyFileError as error:
                raise ConfigError(f"{rule.where}: {error}") from None
            try:
                self._keyless[rule.index] = Keyless.load(
                    config.policy.trusted_root, rule.identities) if rule.identities else None
            except KeylessNotConfigured as error:
                raise ConfigError(f"{rule.where}: {error}") from None
        self.recent: deque[Denial] = deque(maxlen=RECENT)
        self._verdicts: OrderedDict[tuple[int, str], tuple[Verdict, float]] = OrderedDict()
        self._admitted: OrderedDict[tuple[int, str], str] = OrderedDict()
        self._warned: OrderedDict[tuple[int, str], None] = OrderedDict()
        self._applying: dict[tuple[str, str], tuple[SignatureRule, ...]] = {}
        self._contents: dict[str, bool] = {}  # digest: holds no image (an artifact)
        self._flights = Flights()
        # Bound series, created at zero so rate() sees each rule's first verdict.
        self._counts: dict[tuple[int, str], Any] = {}
        if metrics is not None:
            for rule in self.rules:
                for verdict in VERDICTS:
                    self._counts[rule.index, verdict] = \
                        metrics.signature_verdicts.labels(rule.label, verdict, rule.mode)

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def applying(self, scope: str, name: str) -> tuple[SignatureRule, ...]:
        key = (scope, name)
        found = self._applying.get(key)
        if found is None:
            if len(self._applying) >= KNOWN_VERDICTS:
                self._applying.clear()
            found = self._applying[key] = tuple(r for r in self.rules if r.applies(scope, name))
        return found

    async def check(self, route: Route, reference: str, manifest: Manifest, proxy: Proxy,
                    client: str | None) -> None:
        """Raise Denied (enforce) unless every applying rule finds `manifest` signed."""
        rules = self.applying(route.upstream.name, route.name)
        if not rules or self._is_artifact(reference, manifest):
            return
        for rule in rules:
            verdict = await self._verdict(rule, route, manifest, proxy)
            series = self._counts.get((rule.index, verdict.status))
            if series is not None:
                series.inc()
            if verdict.signed or rule.mode == "audit":
                continue
            subject = f"{route.key}@{manifest.digest}"
            if rule.mode == "warn":
                if self._remember(self._warned, (rule.index, manifest.digest), None):
                    log.warning("serving %s although %s: %s (%s warn)", subject,
                                verdict.status, verdict.reason, rule.where)
                continue
            self._deny(rule, verdict, route, reference, manifest.digest, client)

    async def _verdict(self, rule: SignatureRule, route: Route, manifest: Manifest,
                       proxy: Proxy) -> Verdict:
        key = (rule.index, manifest.digest)
        index = self._admitted.get(key)
        if index is not None:
            self._admitted.move_to_end(key)
            return Verdict("signed", f"a child of the signed index {index}")
        found = self._verdicts.get(key)
        if found is not None and found[1] > time.monotonic():
            self._verdicts.move_to_end(key)
            return found[0]
        return await self._flights.run(("signatures", *key),
                                       lambda: self._verify(rule, route, manifest, proxy))

    async def _verify(self, rule: SignatureRule, route: Route, manifest: Manifest,
                      proxy: Proxy) -> Verdict:
        fetch = ProxyFetch(proxy, route)
        try:
            verdict = await verify(route.name, manifest.digest, fetch, self._keys[rule.index],
                                   self._keyless[rule.index])
            if verdict.signed and manifest.media_type in LIST_TYPES:
                body = manifest.body
                if body is None:  # a HEAD by tag: the client's GET of the index follows
                    body = (await proxy.manifest(route, manifest.digest, [], False)).body
                for child in _children(body or b""):
                    self._remember(self._admitted, (rule.index, child), manifest.digest)
        except RegistryError as error:
            # Not a verdict about the image: the upstream could not be asked.
            if rule.mode != "enforce":
                log.warning("could not check the signatures of %s@%s (%s): %s", route.key,
                            manifest.digest, rule.where, error.message)
                return Verdict("unsigned", f"not checked: {error.message}")
            raise Unavailable(f"the signatures of {route.key}@{manifest.digest} could not "
                              f"be checked ({rule.where}): {error.message}") from None
        # Proof lasts; its absence is asked again after a tag's TTL (a signature may come).
        ttl = float("inf") if verdict.signed else route.upstream.tag_ttl
        self._remember(self._verdicts, (rule.index, manifest.digest),
                       (verdict, time.monotonic() + ttl))
        return verdict

    def _deny(self, rule: SignatureRule, verdict: Verdict, route: Route, reference: str,
              digest: str, client: str | None) -> None:
        shown = f"{route.key}{'@' if ':' in reference else ':'}{reference}"
        why = f"{verdict.status}: {verdict.reason}"
        self.recent.appendleft(Denial(time.time(), client or "-", shown, f"{rule.where} {why}"))
        log.info("denied %s (%s) to %s: %s %s", shown, digest, client or "-", rule.where, why)
        raise Denied(f"{rule.where}: {shown} is {why}; only images signed as {rule.where} "
                     "requires may be pulled through this mirror",
                     detail={"rule": rule.label, "name": route.name, "reference": reference,
                             "digest": digest, "verdict": verdict.status})

    def signers(self, rule: SignatureRule) -> tuple[tuple[Key, ...], Keyless | None]:
        """The keys and keyless verifier `rule` checks against (`mirror ls` reuses them)."""
        return self._keys[rule.index], self._keyless[rule.index]

    def _is_artifact(self, reference: str, manifest: Manifest) -> bool:
        """Whether the request is for a signature artifact, which no rule judges."""
        if manifest.body is None or reference.startswith("sha256-"):
            return is_artifact(reference, manifest.media_type, manifest.body)
        # Parsed once per digest: a warm GET costs a dictionary lookup, not a JSON parse.
        found = self._contents.get(manifest.digest)
        if found is None:
            if len(self._contents) >= KNOWN_VERDICTS:
                self._contents.clear()
            found = self._contents[manifest.digest] = _holds_no_image(manifest.body)
        return found

    @staticmethod
    def _remember(cache: OrderedDict, key: tuple, value: Any) -> bool:
        """Put `key` in a bounded LRU; whether it was new."""
        new = key not in cache
        cache[key] = value
        cache.move_to_end(key)
        if len(cache) > KNOWN_VERDICTS:
            cache.popitem(last=False)
        return new


class ProxyFetch:
    """cosign.py's `Fetch`, read through the mirror's cache for one route: what verification
    reads is stored and served like anything a client pulled."""

    def __init__(self, proxy: Proxy, route: Route):
        self.proxy, self.route = proxy, route

    async def manifest(self, name: str, reference: str) -> tuple[bytes, str] | None:
        try:
            found = await self.proxy.manifest(self.route, reference, [], False)
        except ManifestUnknown:
            return None
        return (found.body or b""), found.media_type

    async def blob(self, name: str, digest: str) -> bytes:
        try:
            if await self.proxy.stored_size(digest) is not None:
                try:
                    with open(self.proxy.store.path(digest), "rb") as file:
                        return file.read(MAX_DOCUMENT + 1)
                except FileNotFoundError:  # only in the object store: fetched again below
                    pass
            return await self._fill(digest)
        except BlobUnknown:
            # A signature whose payload is gone admits nothing: a refusal, not an error.
            raise Malformed(f"blob {digest} is missing from the repository") from None

    async def _fill(self, digest: str) -> bytes:
        """Join (or start) the blob's fill, as a client's GET would, and read its spool."""
        fill, fd = await self.proxy.blob_fill(self.route, digest)
        fill.readers += 1
        try:
            await fill.started()
            data, offset = bytearray(), 0
            while len(data) <= MAX_DOCUMENT:
                end = await fill.readable(offset, None)
                if end == offset:
                    break
                data += os.pread(fd, end - offset, offset) if offset < fill.on_disk \
                    else fill.overflow(offset, end - offset)
                offset = len(data)
            return bytes(data)
        finally:
            fill.readers -= 1
            os.close(fd)

    async def referrers(self, name: str, digest: str, artifact_type: str) -> bytes | None:
        try:
            answer = await self.proxy.referrers(self.route, digest, artifact_type)
        except ManifestUnknown:  # no referrers API (Distribution 2.8): the tag schema
            return None
        return answer.body


def is_artifact(reference: str, media_type: str, body: bytes | None) -> bool:
    """Whether a manifest asked for by `reference` is a signature artifact, which no rule
    judges (`body` None: a HEAD by tag, known by name only)."""
    tag = SIGNATURE_TAG.fullmatch(reference) if reference.startswith("sha256-") else None
    if body is None:
        return tag is not None  # a HEAD by tag: its digest's GET is judged by content
    if tag is not None and tag.group(1) is None and media_type in LIST_TYPES:
        return True  # the referrers tag schema's index; its entries are judged by content
    return _holds_no_image(body)


def _holds_no_image(body: bytes) -> bool:
    """Whether a manifest's layers are all signatures, attestations or SBOMs."""
    try:
        document = json_object(body, "manifest")
    except Malformed:
        return False
    layers = document.get("layers")
    return isinstance(layers, list) and bool(layers) and all(
        isinstance(layer, dict) and one_of(layer.get("mediaType"), ARTIFACT_LAYERS)
        for layer in layers)


def _children(body: bytes) -> list[str]:
    try:
        document = json_object(body, "index")
    except Malformed:
        return []
    manifests = document.get("manifests")
    return [entry["digest"] for entry in manifests if isinstance(entry, dict)
            and isinstance(entry.get("digest"), str)] if isinstance(manifests, list) else []
