"""Public keys that a cosign signature is checked against: loading PEM files and verifying.

A `Key` is one PEM public key (SubjectPublicKeyInfo, what `cosign generate-key-pair` writes
to `cosign.pub` and `cosign public-key` prints) with the one signature scheme cosign uses
for its type, as sigstore/sigstore `signature.LoadVerifier` picks it:

- ECDSA P-256: ASN.1 DER signature over SHA-256 of the message (cosign's
  SIGNATURE_SPEC.md "Signature Schemes": ECDSA-P256 is the one scheme every
  implementation must support, hashed with the registry's algorithm, sha256).
- RSA: PKCS#1 v1.5 with SHA-256, what cosign produces (`LoadRSAPKCS1v15Verifier`). PSS
  with SHA-256 is accepted too (sigstore's bundle key details list `PKIX_RSA_PSS_*`):
  it is the same key holder's signature, only a different padding.
- Ed25519: pure Ed25519 over the message itself (`LoadED25519Verifier`); it cannot
  verify a signature given only a digest, so callers pass the message.

Anything else (P-384, DSA, a certificate or a private key in the file) is refused with a
`KeyFileError` naming the file. `fingerprint` is `sha256:` + the hex SHA-256 of the key's DER
SubjectPublicKeyInfo, the value `openssl pkey -pubin -outform DER | sha256sum` prints.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

MAX_KEY_FILE = 64 * 1024
MIN_RSA_BITS = 2048  # sigstore/sigstore's ValidatePubKey refuses smaller RSA keys


class KeyFileError(ValueError):
    """A key file that cannot be used: unreadable, not PEM, or an unsupported algorithm."""


PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class Key:
    """One configured public key; `name` is where it came from (a path), for messages."""

    public_key: PublicKey = field(repr=False)
    name: str
    fingerprint: str

    @property
    def algorithm(self) -> str:
        if isinstance(self.public_key, ec.EllipticCurvePublicKey):
            return "ecdsa-p256-sha256"
        if isinstance(self.public_key, rsa.RSAPublicKey):
            return f"rsa{self.public_key.key_size}-sha256"
        return "ed25519"

    @property
    def needs_message(self) -> bool:
        """Ed25519 signs the message itself, so a digest alone cannot be checked."""
        return isinstance(self.public_key, ed25519.Ed25519PublicKey)

    def verifies(self, signature: bytes, message: bytes) -> bool:
        """True when `signature` is this key's signature over `message`."""
        try:
            if isinstance(self.public_key, ed25519.Ed25519PublicKey):
                self.public_key.verify(signature, message)
                return True
        except InvalidSignature:
            return False
        return self.verifies_digest(signature, hashlib.sha256(message).digest())

    def verifies_digest(self, signature: bytes, digest: bytes) -> bool:
        """True when `signature` is over a message whose SHA-256 is `digest` (not Ed25519)."""
        key = self.public_key
        prehashed = Prehashed(hashes.SHA256())
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, digest, ec.ECDSA(prehashed))
                return True
            if isinstance(key, rsa.RSAPublicKey):
                return _rsa_verifies(key, signature, digest, prehashed)
        except (InvalidSignature, ValueError):
            # ValueError: a digest of the wrong length from a hostile bundle.
            return False
        return False

    def __str__(self) -> str:
        return f"{self.name} ({self.fingerprint})"


def _rsa_verifies(key: rsa.RSAPublicKey, signature: bytes, digest: bytes, prehashed) -> bool:
    schemes = (
        padding.PKCS1v15(),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO),
    )
    for scheme in schemes:
        try:
            key.verify(signature, digest, scheme, prehashed)
            return True
        except InvalidSignature:
            continue
    return False


def parse_key(pem: bytes, name: str) -> Key:
    """Turn PEM bytes into a `Key`; `name` says where they came from in any error."""
    try:
        public_key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyFileError(f"{name}: not a PEM public key ({error})") from None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise KeyFileError(f"{name}: ECDSA curve {public_key.curve.name} is not supported; "
                           "cosign keys are P-256 (secp256r1)")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"{name}: RSA key of {public_key.key_size} bits is too small "
                           f"(at least {MIN_RSA_BITS})")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{name}: {type(public_key).__name__} keys are not supported; "
                       "use ECDSA P-256, RSA or Ed25519")
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(public_key, name, "sha256:" + hashlib.sha256(der).hexdigest())


def load_key(path: str | Path) -> Key:
    """Read one PEM public key file; every failure is a `KeyFileError` naming the file."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            pem = file.read(MAX_KEY_FILE + 1)
    except OSError as error:
        raise KeyFileError(f"{path}: cannot read key file ({error.strerror})") from None
    if len(pem) > MAX_KEY_FILE:
        raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE} bytes, not a public key")
    return parse_key(pem, str(path))
