"""Cosign signature verification of one manifest digest: find its signatures, give a verdict.

`await verify(name, digest, fetch, keys)` looks where cosign puts signatures and answers a
`Verdict`: `signed` (with the key fingerprint or keyless identity that verified), `unsigned`
(nothing found) or `invalid` (something found, none admits the digest, each reason kept).
Two places, both in repository `name` (cosign's default; `COSIGN_REPOSITORY` elsewhere is
not followed):

1. Tag-based, cosign's SIGNATURE_SPEC.md "Tag-based Discovery": tag `sha256-<hex>.sig`, an
   OCI manifest whose layers of media type `application/vnd.dev.cosign.simplesigning.v1+json`
   each carry `dev.cosignproject.cosign/signature` (base64) over the layer blob, the
   simple-signing payload (containers/image docs/containers-signature.5.md). Admitted when
   the blob matches its descriptor, the signature verifies with a configured key over the
   blob (SIGNATURE_SPEC.md: `Sign(sha256(SimpleSigningPayload(...)))`),
   `critical.type` is `cosign container image signature` and
   `critical.image.docker-manifest-digest` is the digest. `critical.identity.docker-
   reference` is not checked: the spec says "The critical.identity.docker-reference field
   is ignored", `cosign verify` does not check it, and a mirror serves one image under
   several names (docker.io/library/alpine, mirror:5000/alpine), so a signature made for
   the upstream name must admit it here too. A legacy keyless signature (certificate
   annotation plus a Rekor bundle annotation) is not supported and is refused with that
   reason.
2. Referrers, cosign's BUNDLE_SPEC.md: referrers of the digest with artifactType
   `application/vnd.dev.sigstore.bundle.v0.3+json`, each a manifest whose first layer is
   the bundle (see bundle.py). Without a referrers API (`fetch.referrers` answers None)
   the referrers tag schema `sha256-<hex>` is read instead (distribution-spec
   "Referrers Tag Schema").

Nothing a registry sends makes this raise: malformed or oversized documents, wrong
digests, bad base64 all end as an `invalid` verdict with a reason. Errors raised by
`fetch` itself (the upstream is down) propagate: that is not a verdict about the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Protocol

from .bundle import (
    BUNDLE_MEDIA_TYPE,
    BUNDLE_MEDIA_TYPES,
    COSIGN_SIGN_PREDICATE,
    Envelope,
    NotASignature,
    check_statement,
    parse_bundle,
)
from .bundle import verify_with_keys as verify_bundle_with_keys
from .formats import (
    DIGEST,
    MAX_DOCUMENT,
    Malformed,
    Refused,
    base64_bytes,
    checked_blob,
    descriptor_digest,
    digest_of,
    find_key,
    json_object,
    one_of,
)
from .keyless import Keyless
from .keys import Key

SIMPLE_SIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
# cosign writes `dev.sigstore.cosign/certificate` (pkg/oci/static); SIGNATURE_SPEC.md's prose
# names `dev.cosignproject.cosign/certificate`.
CERTIFICATE_ANNOTATIONS = frozenset({"dev.sigstore.cosign/certificate",
                                     "dev.cosignproject.cosign/certificate"})
COSIGN_SIGNATURE_TYPE = "cosign container image signature"
# A signature manifest holds one layer per signature; cosign appends, so a busy image has a
# handful. Past these bounds a registry is stalling us, not signing.
MAX_SIGNATURES = 32
MAX_REFERRERS = 32


class Fetch(Protocol):
    """What the caller provides: reads from the repository's registry (upstream or local)."""

    async def manifest(self, name: str, reference: str) -> tuple[bytes, str] | None:
        """The manifest bytes and media type at a tag or digest; None if there is none."""

    async def blob(self, name: str, digest: str) -> bytes:
        """The blob's bytes; the caller may stop reading at MAX_DOCUMENT + 1 bytes, and
        raises its own error for a missing blob (`verify` lets it propagate)."""

    async def referrers(self, name: str, digest: str, artifact_type: str) -> bytes | None:
        """The referrers index (OCI image index bytes); None if there is no referrers API."""


@dataclass(frozen=True)
class Verdict:
    """What the signatures say about one digest; `reason` is for the person refused."""

    status: Literal["signed", "unsigned", "invalid"]
    reason: str
    key: str | None = None  # fingerprint of the verifying key, or the keyless identity
    source: str | None = None  # where the admitting signature was found
    refusals: tuple[str, ...] = field(default=())

    @property
    def signed(self) -> bool:
        return self.status == "signed"


def signature_tag(digest: str) -> str:
    """cosign's tag for a digest's signatures: `sha256:<hex>` → `sha256-<hex>.sig`."""
    return digest.replace(":", "-", 1) + ".sig"


async def verify(name: str, digest: str, fetch: Fetch, keys: Iterable[Key],
                 keyless: Keyless | None = None,
                 predicate_types: Iterable[str] = (COSIGN_SIGN_PREDICATE,)) -> Verdict:
    """The verdict on manifest `digest` in repository `name`, from cosign's signatures."""
    keys = tuple(keys)
    predicate_types = tuple(predicate_types)
    if not DIGEST.fullmatch(digest):
        return Verdict("invalid", f"{digest!r} is not a sha256 digest")
    refusals: list[str] = []
    tag = signature_tag(digest)
    legacy = _Legacy(name, digest, fetch, keys)
    verdict = await legacy.verdict(tag, refusals)
    if verdict is not None:
        return verdict
    bundles = _Bundles(name, digest, fetch, keys, keyless, predicate_types)
    verdict = await bundles.verdict(refusals)
    if verdict is not None:
        return verdict
    if not refusals:
        return Verdict("unsigned", f"no signature at {tag} or in referrers")
    shown = "; ".join(refusals[:3]) + ("; ..." if len(refusals) > 3 else "")
    return Verdict("invalid", shown, refusals=tuple(refusals))


class _Legacy:
    """The `sha256-<hex>.sig` signature manifest and its simple-signing layers."""

    def __init__(self, name: str, digest: str, fetch: Fetch, keys: tuple[Key, ...]):
        self.name, self.digest, self.fetch, self.keys = name, digest, fetch, keys

    async def verdict(self, tag: str, refusals: list[str]) -> Verdict | None:
        found = await self.fetch.manifest(self.name, tag)
        if found is None:
            return None
        try:
            layers = _layers(found[0], f"signature manifest {tag}")
        except Malformed as error:
            refusals.append(str(error))
            return None
        signatures = [layer for layer in layers
                      if isinstance(layer, dict) and layer.get("mediaType")
                      == SIMPLE_SIGNING_MEDIA_TYPE][:MAX_SIGNATURES]
        if not signatures:
            refusals.append(f"signature manifest {tag} has no simple-signing layer")
        for number, layer in enumerate(signatures, 1):
            where = f"{tag} layer {number}" if len(signatures) > 1 else tag
            try:
                key = await self._check(layer, where)
            except Refused as error:
                refusals.append(str(error))
                continue
            return Verdict("signed", f"signed by key {key} at {where}",
                           key=key.fingerprint, source=where)
        return None

    async def _check(self, layer: dict[str, Any], where: str) -> Key:
        annotations = layer.get("annotations")
        if not isinstance(annotations, dict) or SIGNATURE_ANNOTATION not in annotations:
            raise Malformed(f"{where} has no {SIGNATURE_ANNOTATION} annotation")
        signature = base64_bytes(annotations[SIGNATURE_ANNOTATION], f"{where} signature")
        blob_digest = descriptor_digest(layer, f"{where} descriptor")
        size = layer.get("size")
        if isinstance(size, int) and size > MAX_DOCUMENT:
            raise Malformed(f"{where} payload is {size} bytes, over the limit")
        payload = checked_blob(await self.fetch.blob(self.name, blob_digest), layer,
                               f"{where} payload")
        key = next((key for key in self.keys if key.verifies(signature, payload)), None)
        if key is None:
            if CERTIFICATE_ANNOTATIONS & set(annotations):
                raise Refused(f"{where} is a legacy keyless signature (certificate "
                              "annotation), which is not supported; sign with a key or "
                              "a bundle")
            raise Refused(_no_key(self.keys, f"signature at {where}"))
        _check_payload(json_object(payload, f"{where} payload"), self.digest, where)
        return key


def _check_payload(payload: dict[str, Any], digest: str, where: str) -> None:
    """The simple-signing `critical` section must name this digest and cosign's type."""
    critical = find_key(payload, "critical")
    if not isinstance(critical, dict):
        raise Malformed(f"{where} payload has no critical section")
    kind = find_key(critical, "type")
    if kind != COSIGN_SIGNATURE_TYPE:
        raise Refused(f"{where} payload type is {_quoted(kind)}, not "
                      f"{COSIGN_SIGNATURE_TYPE!r}")
    image = find_key(critical, "image")
    named = find_key(image, "docker-manifest-digest") if isinstance(image, dict) else None
    if not isinstance(named, str):
        raise Malformed(f"{where} payload has no critical.image.docker-manifest-digest")
    if named != digest:
        raise Refused(f"payload is for {_quoted(named, bare=True)} not {digest}")


class _Bundles:
    """Sigstore bundles attached as referrers of the digest."""

    def __init__(self, name: str, digest: str, fetch: Fetch, keys: tuple[Key, ...],
                 keyless: Keyless | None, predicate_types: tuple[str, ...]):
        self.name, self.digest, self.fetch, self.keys = name, digest, fetch, keys
        self.keyless, self.predicate_types = keyless, predicate_types
        self.manifest: bytes | None = None

    async def verdict(self, refusals: list[str]) -> Verdict | None:
        index = await self.fetch.referrers(self.name, self.digest, BUNDLE_MEDIA_TYPE)
        where = "referrers"
        if index is None:
            where = self.digest.replace(":", "-", 1)
            found = await self.fetch.manifest(self.name, where)
            index = None if found is None else found[0]
        if index is None:
            return None
        try:
            descriptors = _referrer_descriptors(index, where)
        except Malformed as error:
            refusals.append(str(error))
            return None
        for descriptor in descriptors:
            source = f"referrer {descriptor['digest']}"
            try:
                signer, described = await self._check(descriptor, source)
            except NotASignature:
                continue  # an attestation (SBOM, provenance), not a signature
            except Refused as error:
                refusals.append(f"{source}: {error}")
                continue
            return Verdict("signed", f"signed by {described} in {source}",
                           key=signer, source=source)
        return None

    async def _check(self, descriptor: dict[str, Any], source: str) -> tuple[str, str]:
        """(who signed, said for humans) if this referrer's bundle admits the digest."""
        found = await self.fetch.manifest(self.name, descriptor["digest"])
        if found is None:
            raise Malformed("listed in the referrers index but not found")
        referrer = json_object(checked_blob(found[0], descriptor, "manifest"), "manifest")
        subject = referrer.get("subject")
        if descriptor_digest(subject, "manifest subject") != self.digest:
            raise Refused(f"its subject is {subject['digest']} not {self.digest}")
        layers = _layers(found[0], "manifest")
        if not layers or not isinstance(layers[0], dict) \
                or not one_of(layers[0].get("mediaType"), BUNDLE_MEDIA_TYPES):
            raise Malformed("its first layer is not a sigstore bundle")
        size = layers[0].get("size")
        if isinstance(size, int) and size > MAX_DOCUMENT:
            raise Malformed(f"bundle is {size} bytes, over the limit")
        digest = descriptor_digest(layers[0], "bundle descriptor")
        bundle = parse_bundle(checked_blob(await self.fetch.blob(self.name, digest),
                                           layers[0], "bundle"))
        if isinstance(bundle.content, Envelope):
            # What the statement says is checked before the signature, so an attestation
            # with another predicate is skipped rather than counted as a bad signature.
            check_statement(bundle.content.payload_type, bundle.content.payload,
                            self.digest, self.predicate_types)
        if bundle.keyless:
            if self.keyless is None:
                raise Refused("bundle is keyless (a Fulcio certificate) and keyless "
                              "verification is not configured")
            identity = self.keyless.verify(bundle, self.digest, self.predicate_types)
            return identity, f"keyless identity {identity}"
        manifest = await self._manifest_if_needed()
        key = verify_bundle_with_keys(bundle, self.digest, self.keys, manifest,
                                      self.predicate_types)
        return key.fingerprint, f"key {key}"

    async def _manifest_if_needed(self) -> bytes | None:
        # Only an Ed25519 key needs the signed manifest itself (it cannot check a digest).
        if self.manifest is None and any(key.needs_message for key in self.keys):
            found = await self.fetch.manifest(self.name, self.digest)
            if found is not None and digest_of(found[0]) == self.digest:
                self.manifest = found[0]
        return self.manifest


def _layers(manifest: bytes, what: str) -> list[Any]:
    document = json_object(manifest, what)
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise Malformed(f"{what} has no layers")
    return layers


def _referrer_descriptors(index: bytes, where: str) -> list[dict[str, Any]]:
    document = json_object(index, f"{where} index")
    manifests = document.get("manifests")
    if not isinstance(manifests, list):
        raise Malformed(f"{where} index has no manifests list")
    # The registry may ignore ?artifactType= (it then omits OCI-Filters-Applied), so the
    # filter is applied here as well.
    chosen = [entry for entry in manifests
              if isinstance(entry, dict) and one_of(entry.get("artifactType"), BUNDLE_MEDIA_TYPES)
              and isinstance(entry.get("digest"), str) and DIGEST.fullmatch(entry["digest"])]
    return chosen[:MAX_REFERRERS]


def _no_key(keys: tuple[Key, ...], what: str) -> str:
    if not keys:
        return f"{what} found but no key is configured"
    return f"{what} does not verify with key " + ", ".join(str(key) for key in keys)


def _quoted(value: Any, bare: bool = False) -> str:
    text = value if bare and isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
