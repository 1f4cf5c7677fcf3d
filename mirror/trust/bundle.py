"""Sigstore bundles (cosign v3's signatures): parsing, and checking one with public keys.

The bundle is the JSON form of sigstore protobuf-specs' `dev.sigstore.bundle.v1.Bundle`
(protos/sigstore_bundle.proto): `mediaType`, `verificationMaterial` (a `publicKey` hint,
or a Fulcio `certificate` / `x509CertificateChain` for keyless), and exactly one of

- `messageSignature` (sigstore_common.proto `MessageSignature`): `messageDigest`
  {`algorithm`: "SHA2_256", `digest`: base64} and `signature` (base64) over the message
  whose digest that is. For an image the message is its manifest, so `messageDigest` must
  be the manifest digest being admitted.
- `dsseEnvelope` (envelope.proto, the DSSE protocol): `payload` (base64), `payloadType`,
  `signatures` [{`sig`, `keyid`}], each signature over PAE(payloadType, payload). A bundle
  carries exactly one signature (sigstore_bundle.proto). cosign v3 `sign` writes an
  in-toto statement (`application/vnd.in-toto+json`) with predicateType
  `https://sigstore.dev/cosign/sign/v1` and the manifest digest as its subject
  (cosign cmd/cosign/cli/sign/sign.go `signDigestBundle`).

Key-based checking here does not look at `tlogEntries`: a key configured by the site is
the trust anchor, as with `cosign verify --key K --insecure-ignore-tlog` (an air-gapped
mirror cannot ask Rekor). Keyless bundles go to `keyless.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .formats import (
    DIGEST,
    Malformed,
    Refused,
    base64_bytes,
    digest_of,
    json_object,
    member,
    one_of,
)
from .keys import Key

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
# sigstore_bundle.proto: "Clients must to be able to accept media type using the
# previously defined formats".
BUNDLE_MEDIA_TYPES = frozenset({
    BUNDLE_MEDIA_TYPE,
    "application/vnd.dev.sigstore.bundle+json;version=0.1",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
})
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
IN_TOTO_STATEMENT_TYPES = frozenset({
    "https://in-toto.io/Statement/v1",
    "https://in-toto.io/Statement/v0.1",
})
# What cosign v3 `sign` attests; other predicates (SLSA provenance, SBOMs) signed by the
# same key are attestations about the image, not a signature of it.
COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"


class NotASignature(Refused):
    """A well-formed attestation whose predicate is not one accepted as a signature."""


@dataclass(frozen=True)
class MessageSignature:
    digest: bytes  # messageDigest.digest, the raw SHA-256
    signature: bytes


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signature: bytes


@dataclass(frozen=True)
class Bundle:
    """A parsed bundle: which content it has and whether it needs a certificate check."""

    raw: bytes
    keyless: bool
    content: MessageSignature | Envelope


def parse_bundle(raw: bytes) -> Bundle:
    """Parse bundle JSON; `Malformed` for anything that is not a bundle this code can check."""
    document = json_object(raw, "bundle")
    media_type = document.get("mediaType")
    if not one_of(media_type, BUNDLE_MEDIA_TYPES):
        raise Malformed(f"bundle media type {_quoted(media_type)} is not a sigstore bundle")
    material = member(document, "verificationMaterial", dict, "bundle")
    keyless = "certificate" in material or "x509CertificateChain" in material
    if not keyless and not isinstance(material.get("publicKey"), dict):
        raise Malformed("bundle has neither a public key nor a certificate")
    if ("messageSignature" in document) == ("dsseEnvelope" in document):
        raise Malformed("bundle must have exactly one of messageSignature and dsseEnvelope")
    if "messageSignature" in document:
        return Bundle(raw, keyless, _message_signature(document["messageSignature"]))
    return Bundle(raw, keyless, _envelope(document["dsseEnvelope"]))


def _message_signature(value: Any) -> MessageSignature:
    if not isinstance(value, dict):
        raise Malformed("bundle messageSignature is not an object")
    message_digest = member(value, "messageDigest", dict, "bundle messageSignature")
    if message_digest.get("algorithm") != "SHA2_256":
        raise Malformed("bundle messageDigest algorithm "
                        f"{_quoted(message_digest.get('algorithm'))} is not SHA2_256")
    digest = base64_bytes(message_digest.get("digest"), "bundle messageDigest")
    if len(digest) != 32:
        raise Malformed("bundle messageDigest is not a SHA-256 digest")
    signature = base64_bytes(value.get("signature"), "bundle signature")
    return MessageSignature(digest, signature)


def _envelope(value: Any) -> Envelope:
    if not isinstance(value, dict):
        raise Malformed("bundle dsseEnvelope is not an object")
    payload = base64_bytes(value.get("payload"), "DSSE payload")
    payload_type = member(value, "payloadType", str, "DSSE envelope")
    signatures = member(value, "signatures", list, "DSSE envelope")
    if len(signatures) != 1 or not isinstance(signatures[0], dict):
        raise Malformed(f"DSSE envelope has {len(signatures)} signatures, a bundle has one")
    signature = base64_bytes(signatures[0].get("sig"), "DSSE signature")
    return Envelope(payload_type, payload, signature)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding, the bytes a DSSE signature is over."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def check_statement(payload_type: str, payload: bytes, digest: str,
                    predicate_types: Iterable[str]) -> None:
    """Refuse unless `payload` is an in-toto statement about `digest` with an accepted predicate."""
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise Refused(f"DSSE payload type {_quoted(payload_type)} is not an in-toto statement")
    statement = json_object(payload, "in-toto statement")
    if not one_of(statement.get("_type"), IN_TOTO_STATEMENT_TYPES):
        raise Malformed(f"in-toto statement type {_quoted(statement.get('_type'))} is unknown")
    predicate_type = statement.get("predicateType")
    accepted = set(predicate_types)
    if not one_of(predicate_type, accepted):
        raise NotASignature(f"in-toto predicate {_quoted(predicate_type)} is not a signature "
                      f"(accepted: {', '.join(sorted(accepted))})")
    subjects = member(statement, "subject", list, "in-toto statement")
    named = []
    for subject in subjects[:64]:
        value = subject.get("digest") if isinstance(subject, dict) else None
        hex_digest = value.get("sha256") if isinstance(value, dict) else None
        if isinstance(hex_digest, str):
            named.append("sha256:" + hex_digest.lower())
    if digest in named:
        return
    if not named:
        raise Malformed("in-toto statement has no sha256 subject")
    raise Refused(f"statement is for {named[0]} not {digest}")


def check_message_digest(content: MessageSignature, digest: str) -> None:
    got = "sha256:" + content.digest.hex()
    if got != digest:
        raise Refused(f"bundle is for {got} not {digest}")


def verify_with_keys(bundle: Bundle, digest: str, keys: Iterable[Key],
                     manifest: bytes | None = None,
                     predicate_types: Iterable[str] = (COSIGN_SIGN_PREDICATE,)) -> Key:
    """The key that verifies `bundle` as a signature of `digest`, or `Refused` saying why.

    `manifest` is the manifest's bytes, needed only for an Ed25519 key and a
    messageSignature (Ed25519 signs the message, not its digest).
    """
    if not DIGEST.fullmatch(digest):
        raise Refused(f"{digest!r} is not a sha256 digest")
    keys = list(keys)
    content = bundle.content
    if isinstance(content, MessageSignature):
        check_message_digest(content, digest)
        for key in keys:
            if key.needs_message:
                if manifest is not None and digest_of(manifest) == digest \
                        and key.verifies(content.signature, manifest):
                    return key
            elif key.verifies_digest(content.signature, content.digest):
                return key
        raise Refused(_no_key(keys, "bundle signature"))
    check_statement(content.payload_type, content.payload, digest, predicate_types)
    signed = pae(content.payload_type, content.payload)
    key = next((key for key in keys if key.verifies(content.signature, signed)), None)
    if key is None:
        raise Refused(_no_key(keys, "DSSE signature"))
    return key


def _no_key(keys: list[Key], what: str) -> str:
    if not keys:
        return f"{what} found but no key is configured"
    return f"{what} does not verify with key " + ", ".join(str(key) for key in keys)


def _quoted(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
