"""Signature verdicts for `mirror ls`: `[[policy.signatures]]` judged offline, from storage.

`SignatureVerdicts(config, storage)` loads the rules and their keys as the server does
(trust/signatures.py's `Signatures`: a bad key file is the same ConfigError, keyless only
with `policy.trusted_root`) and runs cosign.py's `verify` with `LocalFetch`, a `Fetch` that
reads only what the storage holds: cached manifests by tag and digest and cached blob files.
Nothing is asked of an upstream, so a signature the mirror never fetched (no pull went
through a rule while the image was pulled) is indistinguishable from none at all: the
verdict then says `no signature cached`, not that the image is unsigned upstream. The
referrers API's answers are not stored, so bundles are found through the referrers tag
schema (`sha256-<hex>`) when the mirror cached it, as it does for upstreams without the API.
Each (rule, digest) is verified once per run, however many tags and repositories share it;
an index that verifies admits the children it lists, as on the request path.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..media import LIST_TYPES, references
from ..reference import is_digest
from ..trust.cosign import Verdict, verify
from ..trust.formats import MAX_DOCUMENT, Malformed
from ..trust.keys import Key
from ..trust.signatures import SignatureRule, Signatures, is_artifact
from .local import Storage

NOT_REQUIRED = "not required"
ARTIFACT = "not judged (a signature artifact)"
NOT_CACHED = "no signature cached"


@dataclass(frozen=True)
class RuleVerdict:
    """One rule's verdict on one digest, as `ls` shows it."""

    rule: SignatureRule
    status: str  # signed, unsigned, invalid
    reason: str

    def __str__(self) -> str:
        """`signed (policy.signatures[0] enforce, key /etc/mirror/cosign.pub)`."""
        return f"{self.status} ({self.rule.where} {self.rule.mode}, {self.reason})"

    def as_json(self) -> dict:
        return {"rule": self.rule.label, "mode": self.rule.mode, "verdict": self.status,
                "reason": self.reason}


class LocalFetch:
    """cosign.py's `Fetch` over the storage alone: no upstream, no network."""

    def __init__(self, storage: Storage, key: str):
        self.storage, self.key = storage, key  # key: <upstream>/<name>, as tags are kept

    async def manifest(self, name: str, reference: str) -> tuple[bytes, str] | None:
        digest = reference if is_digest(reference) else await self._tagged(reference)
        found = None if digest is None else await self.storage.index.manifest(digest)
        return None if found is None else (found[1], found[0])

    async def _tagged(self, tag: str) -> str | None:
        # Verification asks with no Accept (class "index"); a client's narrower pull of the
        # same tag may be all that is kept.
        for accept_class in ("index", "manifest"):
            record = await self.storage.index.tag(self.key, tag, accept_class)
            if record is not None:
                return record.digest
        return None

    async def blob(self, name: str, digest: str) -> bytes:
        try:
            with open(self.storage.store.path(digest), "rb") as file:
                return file.read(MAX_DOCUMENT + 1)
        except FileNotFoundError:
            # A refusal, as the request path's missing payload is: it admits nothing.
            raise Malformed(f"blob {digest} is not cached") from None

    async def referrers(self, name: str, digest: str, artifact_type: str) -> bytes | None:
        return None  # not stored: the referrers tag schema is read instead


class SignatureVerdicts:
    """The signature verdicts of one `ls` run, each (rule, digest) verified once."""

    def __init__(self, config: Config, storage: Storage):
        self.signatures = Signatures(config)  # raises ConfigError for a bad key file
        self.storage = storage
        self._verdicts: dict[tuple[int, str], RuleVerdict] = {}
        self._admitted: dict[tuple[int, str], str] = {}  # (rule, child): its signed index

    async def judge(self, key: str, tag: str, digest: str) -> list[RuleVerdict] | str:
        """Each applying rule's verdict on the manifest `key:tag` answers with, or
        NOT_REQUIRED (no rule covers the repository) or ARTIFACT (a signature, not judged)."""
        scope, name = key.split("/", 1)
        rules = self.signatures.applying(scope, name)
        if not rules:
            return NOT_REQUIRED
        found = await self.storage.index.manifest(digest)
        if found is not None and is_artifact(tag, found[0], found[1]):
            return ARTIFACT
        return [await self._verdict(rule, key, name, digest, found) for rule in rules]

    async def _verdict(self, rule: SignatureRule, key: str, name: str, digest: str,
                       found: tuple[str, bytes] | None) -> RuleVerdict:
        index = self._admitted.get((rule.index, digest))
        if index is not None:
            return RuleVerdict(rule, "signed", f"a child of the signed index {index}")
        known = self._verdicts.get((rule.index, digest))
        if known is None:
            keys, keyless = self.signatures.signers(rule)
            verdict = await verify(name, digest, LocalFetch(self.storage, key), keys, keyless)
            known = self._verdicts[rule.index, digest] = \
                RuleVerdict(rule, verdict.status, _reason(verdict, keys))
            if verdict.signed and found is not None and found[0] in LIST_TYPES:
                for child in references(found[1]):
                    self._admitted.setdefault((rule.index, child), digest)
        return known


def _reason(verdict: Verdict, keys: tuple[Key, ...]) -> str:
    if verdict.status == "unsigned":
        return NOT_CACHED  # offline, `ls` cannot tell it from an image nobody signed
    if verdict.status == "invalid":
        return verdict.reason
    key = next((k for k in keys if k.fingerprint == verdict.key), None)
    return f"key {key.name}" if key is not None else f"identity {verdict.key}"

