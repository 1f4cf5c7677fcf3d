"""Cosign-signed artifacts for tests, in cosign's exact formats, and a registry that holds them.

It owns three things. Signers: one key per type cosign uses (ECDSA P-256, RSA 2048 with
PKCS#1 v1.5 and with PSS, Ed25519), generated with `cryptography` and signing as cosign
does (see mirror/trust/keys.py). Documents built byte-for-byte as cosign writes them: the
simple-signing payload as Go's json.Marshal of cosign's `SimpleContainerImage` prints it
(cosign pkg/cosign/obsolete_test.go shows the exact bytes, `"optional":null` included), the
`sha256-<hex>.sig` signature manifest with the `dev.cosignproject.cosign/signature`
annotation (cosign specs/SIGNATURE_SPEC.md), and cosign v3's referrer manifest around a
sigstore bundle (specs/BUNDLE_SPEC.md, pkg/oci/remote/write.go
`WriteAttestationNewBundleFormat`) holding a messageSignature or a DSSE in-toto statement
(cmd/cosign/cli/sign/sign.go `signDigestBundle`). And `Registry`, the `Fetch` a verifier is
given, holding what a registry would: it answers absent manifests with None, absent blobs
with `BlobUnknown` (a registry's 404), and its referrers API ignores `artifactType` (as a
registry that does not filter does), so the verifier must filter; it counts every request.

The REAL_* constants are bytes real cosign runs produced, kept by other projects' tests:
containers/image signature/fixtures (commit df7e80d2d19872b61f352a8a182ec934dc0c2346):
dir-img-cosign-valid/manifest.json, the payload and signature of its signature-1, and
cosign.pub / cosign2.pub; and sigstore/cosign pkg/cosign/testdata (commit
d6d86c224e5899b54f56cbb063b79dc43abc11c2): oci-attestation.sigstore.json, a keyless DSSE
bundle from the public-good instance, and trusted_root_pgi.json (re-serialized compactly;
a trusted root is parsed, not hashed).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"
KINDS = ("ecdsa", "rsa", "rsa-pss", "ed25519")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def go_json(value: Any) -> bytes:
    """JSON as Go's encoding/json writes it: no spaces, <, > and & escaped, UTF-8 kept."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


@dataclass(frozen=True)
class Signer:
    """A private key and the scheme cosign signs with for its type."""

    kind: str
    private_key: Any = field(repr=False)

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def fingerprint(self) -> str:
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return digest_of(der)

    def sign(self, message: bytes) -> bytes:
        if self.kind == "ed25519":
            return self.private_key.sign(message)
        return self.sign_digest(hashlib.sha256(message).digest())

    def sign_digest(self, digest: bytes) -> bytes:
        """A signature over the message whose SHA-256 is `digest` (what a bundle's
        messageSignature holds for ECDSA and RSA)."""
        prehashed = Prehashed(hashes.SHA256())
        if self.kind == "ecdsa":
            return self.private_key.sign(digest, ec.ECDSA(prehashed))
        if self.kind == "rsa":
            return self.private_key.sign(digest, padding.PKCS1v15(), prehashed)
        if self.kind == "rsa-pss":
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                              salt_length=padding.PSS.DIGEST_LENGTH)
            return self.private_key.sign(digest, pss, prehashed)
        raise ValueError("Ed25519 signs messages, not digests")


@functools.cache
def signer(kind: str, number: int = 0) -> Signer:
    """One key per (kind, number), made once per test session (RSA generation is slow)."""
    if kind == "ecdsa":
        return Signer(kind, ec.generate_private_key(ec.SECP256R1()))
    if kind in ("rsa", "rsa-pss"):
        return Signer(kind, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    if kind == "ed25519":
        return Signer(kind, ed25519.Ed25519PrivateKey.generate())
    raise ValueError(kind)


def simple_signing_payload(digest: str, reference: str = "registry.example/team/app") -> bytes:
    """cosign's payload for `digest`, byte-for-byte (pkg/cosign/payload `Cosign.MarshalJSON`)."""
    return go_json({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    })


def image_manifest(seed: str = "app") -> bytes:
    """A small OCI image manifest; `seed` makes its digest differ between images."""
    layer = hashlib.sha256(seed.encode()).hexdigest()
    return go_json({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "size": 2, "digest": EMPTY_DIGEST},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "size": 32, "digest": "sha256:" + layer}],
    })


def bundle_message_signature(signer: Signer, manifest: bytes) -> bytes:
    """A v0.3 bundle whose messageSignature signs `manifest` (sigstore-go's JSON form)."""
    digest = hashlib.sha256(manifest).digest()
    signature = signer.sign(manifest) if signer.kind == "ed25519" else signer.sign_digest(digest)
    return go_json({
        "mediaType": BUNDLE,
        "verificationMaterial": {"publicKey": {"hint": b64(bytes.fromhex(
            signer.fingerprint.split(":")[1]))}},
        "messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": b64(digest)},
            "signature": b64(signature),
        },
    })


def in_toto_statement(digest: str, predicate_type: str = COSIGN_SIGN_PREDICATE) -> bytes:
    """cosign v3 `sign`'s statement: protojson of an in-toto v1 Statement about `digest`."""
    return go_json({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"digest": {"sha256": digest.split(":")[1]}}],
        "predicateType": predicate_type,
        "predicate": {},
    })


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's PAE, written out again here so the test does not trust the code under test."""
    kind = payload_type.encode()
    return b"DSSEv1 " + str(len(kind)).encode() + b" " + kind + b" " \
        + str(len(payload)).encode() + b" " + payload


def bundle_dsse(signer: Signer, statement: bytes,
                payload_type: str = "application/vnd.in-toto+json") -> bytes:
    """A v0.3 bundle with a DSSE envelope signing `statement`."""
    return go_json({
        "mediaType": BUNDLE,
        "verificationMaterial": {"publicKey": {"hint": ""}},
        "dsseEnvelope": {
            "payload": b64(statement),
            "payloadType": payload_type,
            "signatures": [{"sig": b64(signer.sign(pae(payload_type, statement)))}],
        },
    })


class BlobUnknown(Exception):
    """What a caller's fetch raises for a registry's 404 on a blob."""


class Registry:
    """An in-memory registry serving as the verifier's `Fetch`; `requests` logs each call."""

    def __init__(self, referrers_api: bool = True):
        self.referrers_api = referrers_api
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str]] = []

    def push_blob(self, data: bytes) -> str:
        self.blobs[digest_of(data)] = data
        return digest_of(data)

    def push_manifest(self, name: str, data: bytes, media_type: str = OCI_MANIFEST,
                      tag: str | None = None) -> str:
        digest = digest_of(data)
        self.manifests[(name, digest)] = (data, media_type)
        if tag is not None:
            self.manifests[(name, tag)] = (data, media_type)
        return digest

    def sign(self, name: str, digest: str, signers: list[Signer],
             payload: bytes | None = None) -> bytes:
        """Push the `sha256-<hex>.sig` manifest as cosign does, one layer per signer."""
        payload = simple_signing_payload(digest) if payload is None else payload
        layers = []
        for one in signers:
            layers.append({"mediaType": SIMPLE_SIGNING, "size": len(payload),
                           "digest": self.push_blob(payload),
                           "annotations": {SIGNATURE_ANNOTATION: b64(one.sign(payload))}})
        return self.push_signature_manifest(name, digest, layers)

    def push_signature_manifest(self, name: str, digest: str, layers: list[Any]) -> bytes:
        config = go_json({
            "architecture": "", "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}], "os": "",
            "rootfs": {"type": "layers",
                       "diff_ids": [layer.get("digest") for layer in layers
                                    if isinstance(layer, dict)]},
            "config": {},
        })
        manifest = go_json({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "size": len(config),
                       "digest": self.push_blob(config)},
            "layers": layers,
        })
        self.push_manifest(name, manifest, tag=digest.replace(":", "-") + ".sig")
        return manifest

    def attach(self, name: str, digest: str, bundle: bytes,
               subject: str | None = None) -> str:
        """Push a referrer manifest holding `bundle`, as cosign v3 writes it."""
        manifest = go_json({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": BUNDLE,
            "config": {"mediaType": OCI_EMPTY, "size": 2, "digest": self.push_blob(b"{}")},
            "layers": [{"mediaType": BUNDLE, "size": len(bundle),
                        "digest": self.push_blob(bundle)}],
            "annotations": {"dev.sigstore.bundle.content": "dsse-envelope",
                            "dev.sigstore.bundle.predicateType": COSIGN_SIGN_PREDICATE,
                            "org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
            "subject": {"mediaType": OCI_MANIFEST, "size": 1, "digest": subject or digest},
        })
        referrer = self.push_manifest(name, manifest)
        if not self.referrers_api:
            # The referrers tag schema: an index at tag sha256-<hex> listing the referrers.
            tag = digest.replace(":", "-")
            listed = json.loads(self.manifests.get((name, tag), (b'{"manifests":[]}', ""))[0])
            listed["manifests"].append({"mediaType": OCI_MANIFEST, "digest": referrer,
                                        "size": len(manifest), "artifactType": BUNDLE})
            index = go_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                             "manifests": listed["manifests"]})
            self.push_manifest(name, index, OCI_INDEX, tag=tag)
        return referrer

    async def manifest(self, name: str, reference: str) -> tuple[bytes, str] | None:
        self.requests.append(("manifest", name, reference))
        return self.manifests.get((name, reference))

    async def blob(self, name: str, digest: str) -> bytes:
        self.requests.append(("blob", name, digest))
        if digest not in self.blobs:
            raise BlobUnknown(digest)
        return self.blobs[digest]

    async def referrers(self, name: str, digest: str, artifact_type: str) -> bytes | None:
        self.requests.append(("referrers", name, digest))
        if not self.referrers_api:
            return None
        entries = []
        for (repository, reference), (data, media_type) in self.manifests.items():
            if repository != name or reference != digest_of(data):
                continue
            try:
                document = json.loads(data)
            except ValueError:
                continue  # a registry refuses such a push; it never lists it as a referrer
            subject = document.get("subject") if isinstance(document, dict) else None
            if isinstance(subject, dict) and subject.get("digest") == digest:
                entries.append({"mediaType": media_type, "digest": reference,
                                "size": len(data),
                                "artifactType": document.get("artifactType")})
        return go_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})


class Sigstore:
    """A private Sigstore deployment for keyless tests: a Fulcio CA, a CT log, a Rekor log.

    `trusted_root()` is the `trusted_root.json` an air-gapped site would bring, and
    `sign_dsse()` / `sign_message()` a keyless bundle as cosign v3 writes it against such a
    deployment:
    a short-lived certificate for an identity (email SAN, OIDC issuer extension
    1.3.6.1.4.1.57264.1.1) with its SCT embedded (RFC 6962 §3.2, precertificate entry),
    a DSSE envelope or a message signature made with the certificate's key, and a Rekor
    `dsse` or `hashedrekord` 0.0.1 entry
    with an inclusion promise (a signed entry timestamp over the RFC 8785 form of body,
    integratedTime, logID, logIndex) and an inclusion proof in a one-entry tree whose
    signed checkpoint is a C2SP signed note. Every signature is real, so sigstore-python
    checks all of them, offline.
    """

    def __init__(self) -> None:
        from datetime import datetime, timedelta, timezone

        from cryptography import x509
        from cryptography.x509.oid import NameOID

        self.now = datetime.now(timezone.utc).replace(microsecond=0)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ct_key = ec.generate_private_key(ec.SECP256R1())
        self.rekor_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mirror-tests"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "mirror test fulcio")])
        public = self.ca_key.public_key()
        self.ca = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(self.now - timedelta(days=1))
            .not_valid_after(self.now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                         False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                           critical=False)
            .sign(self.ca_key, hashes.SHA256()))

    @staticmethod
    def _key_id(key: Any) -> bytes:
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).digest()

    def _public_key(self, key: Any) -> dict[str, Any]:
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        start = (self.now.replace(year=self.now.year - 1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return {"rawBytes": b64(der), "keyDetails": "PKIX_ECDSA_P256_SHA_256",
                "validFor": {"start": start}}

    def trusted_root(self) -> bytes:
        """The `dev.sigstore.trustedroot.v1.TrustedRoot` document for this deployment."""
        start = (self.now.replace(year=self.now.year - 1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return go_json({
            "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
            "tlogs": [{"baseUrl": "https://rekor.mirror.test", "hashAlgorithm": "SHA2_256",
                       "publicKey": self._public_key(self.rekor_key),
                       "logId": {"keyId": b64(self._key_id(self.rekor_key))}}],
            "certificateAuthorities": [{
                "subject": {"organization": "mirror-tests", "commonName": "mirror test fulcio"},
                "uri": "https://fulcio.mirror.test",
                "certChain": {"certificates": [
                    {"rawBytes": b64(self.ca.public_bytes(serialization.Encoding.DER))}]},
                "validFor": {"start": start}}],
            "ctlogs": [{"baseUrl": "https://ctfe.mirror.test", "hashAlgorithm": "SHA2_256",
                        "publicKey": self._public_key(self.ct_key),
                        "logId": {"keyId": b64(self._key_id(self.ct_key))}}],
        })

    def certificate(self, key: Any, identity: str, issuer: str) -> Any:
        """A Fulcio-style leaf for `identity`, its SCT embedded (signed over the precert TBS)."""
        import struct
        from datetime import timedelta

        from cryptography import x509

        def build(extra: list[Any]) -> Any:
            builder = (
                x509.CertificateBuilder().subject_name(x509.Name([]))
                .issuer_name(self.ca.subject).public_key(key.public_key())
                .serial_number(serial)
                .not_valid_before(self.now - timedelta(minutes=1))
                .not_valid_after(self.now + timedelta(minutes=10))
                .add_extension(x509.KeyUsage(True, False, False, False, False, False, False,
                                             False, False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING]),
                               critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.ca_key.public_key()), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(identity)]),
                               critical=True)
                .add_extension(x509.UnrecognizedExtension(
                    x509.ObjectIdentifier("1.3.6.1.4.1.57264.1.1"), issuer.encode()),
                    critical=False))
            for extension in extra:
                builder = builder.add_extension(extension, critical=False)
            return builder.sign(self.ca_key, hashes.SHA256())

        serial = x509.random_serial_number()
        precert = build([])
        tbs = precert.tbs_certificate_bytes
        timestamp = int(self.now.timestamp() * 1000)
        issuer_key_hash = self._key_id(self.ca_key)
        signed = (struct.pack("!BBQH", 0, 0, timestamp, 1) + issuer_key_hash
                  + len(tbs).to_bytes(3, "big") + tbs + struct.pack("!H", 0))
        signature = self.ct_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        sct = (struct.pack("!B", 0) + self._key_id(self.ct_key) + struct.pack("!QH", timestamp, 0)
               + struct.pack("!BBH", 4, 3, len(signature)) + signature)
        sct_list = struct.pack("!HH", len(sct) + 2, len(sct)) + sct
        octets = b"\x04" + _der_length(len(sct_list)) + sct_list
        certificate = build([x509.UnrecognizedExtension(
            x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.4.2"), octets)])
        assert certificate.tbs_precertificate_bytes == tbs
        return certificate

    def sign_dsse(self, statement: bytes, identity: str, issuer: str,
                  payload_type: str = "application/vnd.in-toto+json") -> bytes:
        """A keyless v0.3 bundle signing `statement` (DSSE), logged as a `dsse` entry."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self.certificate(key, identity, issuer)
        signature = key.sign(pae(payload_type, statement), ec.ECDSA(hashes.SHA256()))
        envelope = {"payload": b64(statement), "payloadType": payload_type,
                    "signatures": [{"sig": b64(signature)}]}
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        body = {
            "apiVersion": "0.0.1", "kind": "dsse",
            "spec": {"envelopeHash": {"algorithm": "sha256",
                                      "value": hashlib.sha256(go_json(envelope)).hexdigest()},
                     "payloadHash": {"algorithm": "sha256",
                                     "value": hashlib.sha256(statement).hexdigest()},
                     "signatures": [{"signature": b64(signature), "verifier": b64(pem)}]},
        }
        return self._bundle(certificate, body, {"dsseEnvelope": envelope})

    def sign_message(self, message: bytes, identity: str, issuer: str) -> bytes:
        """A keyless v0.3 bundle whose messageSignature signs `message`, logged as a
        `hashedrekord` entry (what cosign writes for a signed manifest or blob)."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self.certificate(key, identity, issuer)
        signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
        digest = hashlib.sha256(message).digest()
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        body = {
            "apiVersion": "0.0.1", "kind": "hashedrekord",
            "spec": {"data": {"hash": {"algorithm": "sha256", "value": digest.hex()}},
                     "signature": {"content": b64(signature), "publicKey": {"content": b64(pem)}}},
        }
        content = {"messageSignature": {
            "messageDigest": {"algorithm": "SHA2_256", "digest": b64(digest)},
            "signature": b64(signature)}}
        return self._bundle(certificate, body, content)

    def _bundle(self, certificate: Any, entry_body: dict[str, Any],
                content: dict[str, Any]) -> bytes:
        """The bundle around `content`, with `entry_body` logged in this deployment's Rekor."""
        body = _canonical(entry_body)
        log_id = self._key_id(self.rekor_key)
        integrated = int(self.now.timestamp())
        promise = self.rekor_key.sign(_canonical({
            "body": b64(body), "integratedTime": integrated, "logID": log_id.hex(),
            "logIndex": 0}), ec.ECDSA(hashes.SHA256()))
        root = hashlib.sha256(b"\x00" + body).digest()  # RFC 6962 leaf hash; tree of one
        note = f"rekor.mirror.test - 1\n1\n{b64(root)}\n"
        note_signature = self.rekor_key.sign(note.encode(), ec.ECDSA(hashes.SHA256()))
        checkpoint = note + f"\n\u2014 rekor.mirror.test {b64(log_id[:4] + note_signature)}\n"
        return go_json({
            "mediaType": BUNDLE,
            "verificationMaterial": {
                "certificate": {"rawBytes": b64(certificate.public_bytes(
                    serialization.Encoding.DER))},
                "tlogEntries": [{
                    "logIndex": "0", "logId": {"keyId": b64(log_id)},
                    "kindVersion": {"kind": entry_body["kind"], "version": "0.0.1"},
                    "integratedTime": str(integrated),
                    "inclusionPromise": {"signedEntryTimestamp": b64(promise)},
                    "inclusionProof": {"logIndex": "0", "rootHash": b64(root), "treeSize": "1",
                                       "hashes": [], "checkpoint": {"envelope": checkpoint}},
                    "canonicalizedBody": b64(body)}]},
            **content,
        })


def _canonical(value: Any) -> bytes:
    """RFC 8785 JSON for ASCII strings and integers: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


REAL_MANIFEST = (
    b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+'
    b'json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","si'
    b'ze":1512,"digest":"sha256:961769676411f082461f9ef46626dd7a2d1e2b2a38e6a44364bcbe'
    b'cf51e66dd4"},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.ta'
    b'r.gzip","size":2896510,"digest":"sha256:9d16cba9fb961d1aafec9542f2bf7cb64acfc552'
    b'45f9e4eb5abecd4cdc38d749"}]}'
)
REAL_PAYLOAD = (
    b'{"critical":{"identity":{"docker-reference":"192.168.64.2:5000/cosign-signed-sin'
    b'gle-sample"},"image":{"docker-manifest-digest":"sha256:634a8f35b5f16dcf4aaa0822a'
    b'dc0b1964bb786fca12f6831de8ddc45e5986a00"},"type":"cosign container image signatu'
    b're"},"optional":null}'
)
REAL_SIGNATURE = (
    'MEYCIQDmtamqYPjMg81nqeBhptrPls44aA/r7PwLmspINJY4MwIhANKRpqe2E9UCBtGFdPoz/8jAbaQm'
    '4uP4h+IpwKTE6ClR'
)
REAL_KEY = (
    b'-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEFNLqFhf4fiN6o/glA'
    b'uYnq2jYUeL0\nvRuLu/z39pmbVwS9ff5AYnlwaP9sxREajdLY9ynM6G1sy6AAmb7Z63TsLg==\n-----EN'
    b'D PUBLIC KEY-----\n'
)
REAL_OTHER_KEY = (
    b'-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEwOkOF9xpfG8ghueIh'
    b'nZ66ooujwt1\n+ReV3HupgKnGFYnEh3Hh1YTg5L6kN1Yakkt5WltRoav8/R3hpCtUO3Rldw==\n-----EN'
    b'D PUBLIC KEY-----\n'
)
REAL_BUNDLE = (
    b'{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificati'
    b'onMaterial":{"certificate":{"rawBytes":"MIICzzCCAlWgAwIBAgIUF2e+Ci0YsLnP'
    b'aFUknbNDtUcqXl0wCgYIKoZIzj0EAwMwNzEVMBMGA1UEChMMc2lnc3RvcmUuZGV2MR4wHAYD'
    b'VQQDExVzaWdzdG9yZS1pbnRlcm1lZGlhdGUwHhcNMjUwMjI4MTkxODExWhcNMjUwMjI4MTky'
    b'ODExWjAAMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEk/CiYRmA9zsa7ams/+fI+wGeXOFx'
    b'ng4J0wSj1jub7kxArHhGwvgcVE3ubrGXNQB9X3ksG0F+MiXHG8gRzxrr0KOCAXQwggFwMA4G'
    b'A1UdDwEB/wQEAwIHgDATBgNVHSUEDDAKBggrBgEFBQcDAzAdBgNVHQ4EFgQUcPdotYluBHI4'
    b'fkYy3yij5SY4728wHwYDVR0jBBgwFoAU39Ppz1YkEZb5qNjpKFWixi4YZD8wHgYDVR0RAQH/'
    b'BBQwEoEQY29keUBzb3lsYW5kLmNvbTAsBgorBgEEAYO/MAEBBB5odHRwczovL2dpdGh1Yi5j'
    b'b20vbG9naW4vb2F1dGgwLgYKKwYBBAGDvzABCAQgDB5odHRwczovL2dpdGh1Yi5jb20vbG9n'
    b'aW4vb2F1dGgwgYoGCisGAQQB1nkCBAIEfAR6AHgAdgDdPTBqxscRMmMZHhyZZzcCokpeuN48'
    b'rf+HinKALynujgAAAZVN/q3JAAAEAwBHMEUCIQCdLrw1b9rE6rFd+NAJVPaw4DmH0YNOH2AY'
    b'IOc4g26WmgIgG7Gub5hz7gzFpvhdb9HQsObWfTNcUiSOmrnPlmaQaKUwCgYIKoZIzj0EAwMD'
    b'aAAwZQIxAMwB66cCKVhOYq2JMx20FPfJXD6K6oaUV8aIlCiW/YLLZdkWjTWkXt4qIbPgUeAl'
    b'6wIwdCmnnSMw9fG7FuKz14RYFSbE1VLhNiWhGYpfCj00FtNRoXF+NFQ7DOKjjq7xPjza"},"'
    b'tlogEntries":[{"logIndex":"175508996","logId":{"keyId":"wNI9atQGlz+VWfO6'
    b'LRygH4QUfY/8W4RFwiT5i5WRgB0="},"kindVersion":{"kind":"dsse","version":"0'
    b'.0.1"},"integratedTime":"1740770291","inclusionPromise":{"signedEntryTim'
    b'estamp":"MEUCIQDIgcWm5sXPh52rA/3BLyvfymD4RLEze5cx0WrDCF7tXAIgDtDq9wgYo8Z'
    b'6RQ/LIaMRY/clocjCbX1qZTI9EVrGbzQ="},"inclusionProof":{"logIndex":"536047'
    b'34","rootHash":"nd/V1IEweXlu0reIQGaGK1d51xW4Rj8fUyTrmcUkrMY=","treeSize"'
    b':"53604735","hashes":["p7adBuLwiHyxFA7sjjx9Jt+YJ9NJ6pPRsqrlFv/Prl4=","V8'
    b'kTVhZDHU0oMb8SoiG+IJzfi1+zs8k07t7msfdk3DU=","Y9K/VuEpG5hexjkO0eGf5aWgfD1'
    b'no2I/HmjLL79pGOw=","49xFd2wqEUENt7vh3yabkMXtEu6nNJxA6xJDF35HkvQ=","fldHl'
    b'NczrXBcOY4UnkC1im8c3AZGOojtqHIrnWG81FA=","9JKlhk57UmiGCygvf555Z0loJkdvt8'
    b'BLIwGeMAuJM1o=","JuKjSUhL4pgP2+mTbT/X01oQa16n9Nh2ruwSgN9Ft3o=","6g/GERaj'
    b'YnzZjZ0EXQIVHpGIKry1LMG0+RJhvtcbSwI=","62MSvX4iwxK6VPg9s7NR+Y1jiYkd/SsZp'
    b'VoaUYjD8wg=","K7s/kEEUl/59VblorlWa2aJO8TuH5uy8kn/7qSY+T94=","GlND1TZKB9H'
    b'1XkH8gmyEmNId6gWGYnXjA0ykMIJaI44=","315PrxqKtUW8bpqBdn6SMyj+smOwK7jCa7Px'
    b'7i4AIOQ=","lL6jxdDTg23iUvuwRop1833jkmWSvr7sLBM3hXZ8tTU=","eExzddanJoxYTK'
    b'oErFFSTDFUR3UvwaaXxcddWwQJd7I=","ebCKJ53lKWPqIx8mXXgznF9DGoQv70J7JTlFAav'
    b'6s5E=","vemyaMj0Na1LMjbB/9Dmkq8T+jAb3o+yCESgAayUABU="],"checkpoint":{"en'
    b'velope":"rekor.sigstore.dev - 1193050959916656506\\n53604735\\nnd/V1IEweXl'
    b'u0reIQGaGK1d51xW4Rj8fUyTrmcUkrMY=\\n\\n\xe2\x80\x94 rekor.sigstore.dev wNI9ajBFAiEAuh'
    b'6liXP/rBKWjuO/W8jooM66eVHSXo3Cf8kEAIryZLACIAfCuhLOHpSnU3WA68gZci57o2JuwX'
    b'7S5H6ANbGePH58\\n"}},"canonicalizedBody":"eyJhcGlWZXJzaW9uIjoiMC4wLjEiLCJ'
    b'raW5kIjoiZHNzZSIsInNwZWMiOnsiZW52ZWxvcGVIYXNoIjp7ImFsZ29yaXRobSI6InNoYTI'
    b'1NiIsInZhbHVlIjoiYzZhZGFhZjE0OTA4NGYxOTc3YzE0YjViMTQxMmY4ODI1OGU1ODMwZDg'
    b'3YTVjNjQ0MDNjNDAzYjliNzNmZjEzNiJ9LCJwYXlsb2FkSGFzaCI6eyJhbGdvcml0aG0iOiJ'
    b'zaGEyNTYiLCJ2YWx1ZSI6IjE1NjkyNjE2ZTljNDM1OTA3YzQxNDExNDY2ZTQ5M2YxOTVhMzl'
    b'jYTY4Yzk3M2E0ZjUzOTBkZjNkMzAxMzk4YmQifSwic2lnbmF0dXJlcyI6W3sic2lnbmF0dXJ'
    b'lIjoiTUVRQ0lEb21pdVlWZ05LeWZZei9sZXF2dEVZMnh1aWZ0ZWlnanErTGZTaHU5MkJCQWl'
    b'CeGl4c0daTllCVlJoR2pYNk9aaVBRQklvVWYraThWZ1BoLy9BVC96NFZnZz09IiwidmVyaWZ'
    b'pZXIiOiJMUzB0TFMxQ1JVZEpUaUJEUlZKVVNVWkpRMEZVUlMwdExTMHRDazFKU1VONmVrTkR'
    b'RV3hYWjBGM1NVSkJaMGxWUmpKbEswTnBNRmx6VEc1UVlVWlZhMjVpVGtSMFZXTnhXR3d3ZDB'
    b'ObldVbExiMXBKZW1vd1JVRjNUWGNLVG5wRlZrMUNUVWRCTVZWRlEyaE5UV015Ykc1ak0xSjJ'
    b'ZMjFWZFZwSFZqSk5ValIzU0VGWlJGWlJVVVJGZUZaNllWZGtlbVJIT1hsYVV6RndZbTVTYkF'
    b'wamJURnNXa2RzYUdSSFZYZElhR05PVFdwVmQwMXFTVFJOVkd0NFQwUkZlRmRvWTA1TmFsVjN'
    b'UV3BKTkUxVWEzbFBSRVY0VjJwQlFVMUdhM2RGZDFsSUNrdHZXa2w2YWpCRFFWRlpTVXR2V2t'
    b'sNmFqQkVRVkZqUkZGblFVVnJMME5wV1ZKdFFUbDZjMkUzWVcxekx5dG1TU3QzUjJWWVQwWjR'
    b'ibWMwU2pCM1Uyb0tNV3AxWWpkcmVFRnlTR2hIZDNablkxWkZNM1ZpY2tkWVRsRkNPVmd6YTN'
    b'OSE1FWXJUV2xZU0VjNFoxSjZlSEp5TUV0UFEwRllVWGRuWjBaM1RVRTBSd3BCTVZWa1JIZEZ'
    b'RaTkzVVVWQmQwbElaMFJCVkVKblRsWklVMVZGUkVSQlMwSm5aM0pDWjBWR1FsRmpSRUY2UVd'
    b'SQ1owNVdTRkUwUlVablVWVmpVR1J2Q25SWmJIVkNTRWswWm10WmVUTjVhV28xVTFrME56STR'
    b'kMGgzV1VSV1VqQnFRa0puZDBadlFWVXpPVkJ3ZWpGWmEwVmFZalZ4VG1wd1MwWlhhWGhwTkZ'
    b'rS1drUTRkMGhuV1VSV1VqQlNRVkZJTDBKQ1VYZEZiMFZSV1RJNWEyVlZRbnBpTTJ4eldWYzF'
    b'hMHh0VG5aaVZFRnpRbWR2Y2tKblJVVkJXVTh2VFVGRlFncENRalZ2WkVoU2QyTjZiM1pNTW1'
    b'Sd1pFZG9NVmxwTldwaU1qQjJZa2M1Ym1GWE5IWmlNa1l4WkVkbmQweG5XVXRMZDFsQ1FrRkh'
    b'SSFo2UVVKRFFWRm5Da1JDTlc5a1NGSjNZM3B2ZGt3eVpIQmtSMmd4V1drMWFtSXlNSFppUnp'
    b'sdVlWYzBkbUl5UmpGa1IyZDNaMWx2UjBOcGMwZEJVVkZDTVc1clEwSkJTVVVLWmtGU05rRkl'
    b'aMEZrWjBSa1VGUkNjWGh6WTFKTmJVMWFTR2g1V2xwNlkwTnZhM0JsZFU0ME9ISm1LMGhwYmt'
    b'0QlRIbHVkV3BuUVVGQldsWk9MM0V6U2dwQlFVRkZRWGRDU0UxRlZVTkpVVU5rVEhKM01XSTV'
    b'ja1UyY2taa0swNUJTbFpRWVhjMFJHMUlNRmxPVDBneVFWbEpUMk0wWnpJMlYyMW5TV2RITjB'
    b'kMUNtSTFhSG8zWjNwR2NIWm9aR0k1U0ZGelQySlhabFJPWTFWcFUwOXRjbTVRYkcxaFVXRkx'
    b'WWGREWjFsSlMyOWFTWHBxTUVWQmQwMUVZVUZCZDFwUlNYZ0tRVTEzUWpZMlkwTkxWbWhQV1h'
    b'FeVNrMTRNakJHVUdaS1dFUTJTelp2WVZWV09HRkpiRU5wVnk5WlRFeGFaR3RYYWxSWGExaDB'
    b'OSEZKWWxCblZXVkJiQW8yZDBsM1pFTnRibTVUVFhjNVprYzNSblZMZWpFMFVsbEdVMkpGTVZ'
    b'aTWFFNXBWMmhIV1hCbVEyb3dNRVowVGxKdldFWXJUa1pSTjBSUFMycHFjVGQ0Q2xCcWVtRUt'
    b'MUzB0TFMxRlRrUWdRMFZTVkVsR1NVTkJWRVV0TFMwdExRbz0ifV19fQ=="}]},"dsseEnvel'
    b'ope":{"payload":"eyJfdHlwZSI6Imh0dHBzOi8vaW4tdG90by5pby9TdGF0ZW1lbnQvdjA'
    b'uMSIsInByZWRpY2F0ZVR5cGUiOiJodHRwczovL2Nvc2lnbi5zaWdzdG9yZS5kZXYvYXR0ZXN'
    b'0YXRpb24vdjEiLCJzdWJqZWN0IjpbeyJuYW1lIjoiMTI3LjAuMC4xOjYwOTQzL3JlcG8iLCJ'
    b'kaWdlc3QiOnsic2hhMjU2IjoiNzMyMTEyMjcwZDdlNTk0MThhOGMwODBiMTM0YjI0Y2FiZDY'
    b'3ZDI1MGQwZDAxNDdhOTdlZDk1YmE1YzI4MGFhNCJ9fV0sInByZWRpY2F0ZSI6eyJEYXRhIjo'
    b'ie1wiZm9vXCI6IFwiYmFyXCJ9XG4iLCJUaW1lc3RhbXAiOiIyMDI1LTAyLTI4VDE5OjE4OjE'
    b'xWiJ9fQ==","payloadType":"application/vnd.in-toto+json","signatures":[{"'
    b'sig":"MEQCIDomiuYVgNKyfYz/leqvtEY2xuifteigjq+LfShu92BBAiBxixsGZNYBVRhGjX'
    b'6OZiPQBIoUf+i8VgPh//AT/z4Vgg=="}]}}'
)
REAL_TRUSTED_ROOT = (
    b'{"mediaType":"application/vnd.dev.sigstore.trustedroot+json;version=0.1","tlogs"'
    b':[{"baseUrl":"https://rekor.sigstore.dev","hashAlgorithm":"SHA2_256","publicKey"'
    b':{"rawBytes":"MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G2Y+2tabdTV5BcGiBIx0a9fAFwrkB'
    b'bmLSGtks4L3qX6yYY0zufBnhC8Ur/iy55GhWP/9A/bY2LhC30M9+RYtw==","keyDetails":"PKIX_E'
    b'CDSA_P256_SHA_256","validFor":{"start":"2021-01-12T11:53:27.000Z"}},"logId":{"ke'
    b'yId":"wNI9atQGlz+VWfO6LRygH4QUfY/8W4RFwiT5i5WRgB0="}}],"certificateAuthorities":'
    b'[{"subject":{"organization":"sigstore.dev","commonName":"sigstore"},"uri":"https'
    b'://fulcio.sigstore.dev","certChain":{"certificates":[{"rawBytes":"MIIB+DCCAX6gAw'
    b'IBAgITNVkDZoCiofPDsy7dfm6geLbuhzAKBggqhkjOPQQDAzAqMRUwEwYDVQQKEwxzaWdzdG9yZS5kZX'
    b'YxETAPBgNVBAMTCHNpZ3N0b3JlMB4XDTIxMDMwNzAzMjAyOVoXDTMxMDIyMzAzMjAyOVowKjEVMBMGA1'
    b'UEChMMc2lnc3RvcmUuZGV2MREwDwYDVQQDEwhzaWdzdG9yZTB2MBAGByqGSM49AgEGBSuBBAAiA2IABL'
    b'SyA7Ii5k+pNO8ZEWY0ylemWDowOkNa3kL+GZE5Z5GWehL9/A9bRNA3RbrsZ5i0JcastaRL7Sp5fp/jD5'
    b'dxqc/UdTVnlvS16an+2Yfswe/QuLolRUCrcOE2+2iA5+tzd6NmMGQwDgYDVR0PAQH/BAQDAgEGMBIGA1'
    b'UdEwEB/wQIMAYBAf8CAQEwHQYDVR0OBBYEFMjFHQBBmiQpMlEk6w2uSu1KBtPsMB8GA1UdIwQYMBaAFM'
    b'jFHQBBmiQpMlEk6w2uSu1KBtPsMAoGCCqGSM49BAMDA2gAMGUCMH8liWJfMui6vXXBhjDgY4MwslmN/T'
    b'JxVe/83WrFomwmNf056y1X48F9c4m3a3ozXAIxAKjRay5/aj/jsKKGIkmQatjI8uupHr/+CxFvaJWmpY'
    b'qNkLDGRU+9orzh5hI2RrcuaQ=="}]},"validFor":{"start":"2021-03-07T03:20:29.000Z","e'
    b'nd":"2022-12-31T23:59:59.999Z"}},{"subject":{"organization":"sigstore.dev","comm'
    b'onName":"sigstore"},"uri":"https://fulcio.sigstore.dev","certChain":{"certificat'
    b'es":[{"rawBytes":"MIICGjCCAaGgAwIBAgIUALnViVfnU0brJasmRkHrn/UnfaQwCgYIKoZIzj0EAw'
    b'MwKjEVMBMGA1UEChMMc2lnc3RvcmUuZGV2MREwDwYDVQQDEwhzaWdzdG9yZTAeFw0yMjA0MTMyMDA2MT'
    b'VaFw0zMTEwMDUxMzU2NThaMDcxFTATBgNVBAoTDHNpZ3N0b3JlLmRldjEeMBwGA1UEAxMVc2lnc3Rvcm'
    b'UtaW50ZXJtZWRpYXRlMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE8RVS/ysH+NOvuDZyPIZtilgUF9Nlar'
    b'YpAd9HP1vBBH1U5CV77LSS7s0ZiH4nE7Hv7ptS6LvvR/STk798LVgMzLlJ4HeIfF3tHSaexLcYpSASr1'
    b'kS0N/RgBJz/9jWCiXno3sweTAOBgNVHQ8BAf8EBAMCAQYwEwYDVR0lBAwwCgYIKwYBBQUHAwMwEgYDVR'
    b'0TAQH/BAgwBgEB/wIBADAdBgNVHQ4EFgQU39Ppz1YkEZb5qNjpKFWixi4YZD8wHwYDVR0jBBgwFoAUWM'
    b'AeX5FFpWapesyQoZMi0CrFxfowCgYIKoZIzj0EAwMDZwAwZAIwPCsQK4DYiZYDPIaDi5HFKnfxXx6ASS'
    b'VmERfsynYBiX2X6SJRnZU84/9DZdnFvvxmAjBOt6QpBlc4J/0DxvkTCqpclvziL6BCCPnjdlIB3Pu3Bx'
    b'sPmygUY7Ii2zbdCdliiow="},{"rawBytes":"MIIB9zCCAXygAwIBAgIUALZNAPFdxHPwjeDloDwyYC'
    b'hAO/4wCgYIKoZIzj0EAwMwKjEVMBMGA1UEChMMc2lnc3RvcmUuZGV2MREwDwYDVQQDEwhzaWdzdG9yZT'
    b'AeFw0yMTEwMDcxMzU2NTlaFw0zMTEwMDUxMzU2NThaMCoxFTATBgNVBAoTDHNpZ3N0b3JlLmRldjERMA'
    b'8GA1UEAxMIc2lnc3RvcmUwdjAQBgcqhkjOPQIBBgUrgQQAIgNiAAT7XeFT4rb3PQGwS4IajtLk3/Olnp'
    b'gangaBclYpsYBr5i+4ynB07ceb3LP0OIOZdxexX69c5iVuyJRQ+Hz05yi+UF3uBWAlHpiS5sh0+H2GHE'
    b'7SXrk1EC5m1Tr19L9gg92jYzBhMA4GA1UdDwEB/wQEAwIBBjAPBgNVHRMBAf8EBTADAQH/MB0GA1UdDg'
    b'QWBBRYwB5fkUWlZql6zJChkyLQKsXF+jAfBgNVHSMEGDAWgBRYwB5fkUWlZql6zJChkyLQKsXF+jAKBg'
    b'gqhkjOPQQDAwNpADBmAjEAj1nHeXZp+13NWBNa+EDsDP8G1WWg1tCMWP/WHPqpaVo0jhsweNFZgSs0eE'
    b'7wYI4qAjEA2WB9ot98sIkoF3vZYdd3/VtWB5b9TNMea7Ix/stJ5TfcLLeABLE4BNJOsQ4vnBHJ"}]},"'
    b'validFor":{"start":"2022-04-13T20:06:15.000Z"}}],"ctlogs":[{"baseUrl":"https://c'
    b'tfe.sigstore.dev/test","hashAlgorithm":"SHA2_256","publicKey":{"rawBytes":"MFkwE'
    b'wYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEbfwR+RJudXscgRBRpKX1XFDy3PyudDxz/SfnRi1fT8ekpfBd2'
    b'O1uoz7jr3Z8nKzxA69EUQ+eFCFI3zeubPWU7w==","keyDetails":"PKIX_ECDSA_P256_SHA_256",'
    b'"validFor":{"start":"2021-03-14T00:00:00.000Z","end":"2022-10-31T23:59:59.999Z"}'
    b'},"logId":{"keyId":"CGCS8ChS/2hF0dFrJ4ScRWcYrBY9wzjSbea8IgY2b3I="}},{"baseUrl":"'
    b'https://ctfe.sigstore.dev/2022","hashAlgorithm":"SHA2_256","publicKey":{"rawByte'
    b's":"MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEiPSlFi0CmFTfEjCUqF9HuCEcYXNKAaYalIJmBZ8y'
    b'yezPjTqhxrKBpMnaocVtLJBI1eM3uXnQzQGAJdJ4gs9Fyw==","keyDetails":"PKIX_ECDSA_P256_'
    b'SHA_256","validFor":{"start":"2022-10-20T00:00:00.000Z"}},"logId":{"keyId":"3T0w'
    b'asbHETJjGR4cmWc3AqJKXrjePK3/h4pygC8p7o4="}}]}'
)
