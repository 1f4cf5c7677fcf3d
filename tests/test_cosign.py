"""Cosign signature verification: tag-based signatures, referrer bundles, keys, keyless.

Signed artifacts come from tests/support/cosign.py (cosign's exact formats, built with
`cryptography`) and from real cosign output kept in containers/image's and cosign's test
data (the REAL_* constants there).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.trust import cosign
from mirror.trust.cosign import Verdict, verify
from mirror.trust.formats import MAX_DOCUMENT
from mirror.trust.keyless import Identity, Keyless, KeylessNotConfigured
from mirror.trust.keys import KeyFileError, load_key, parse_key
from tests.support import cosign as fx
from tests.support.cosign import KINDS, Registry, digest_of, signer

NAME = "team/app"


def key_of(one: fx.Signer):
    return parse_key(one.public_pem, f"{one.kind}.pub")


def signed_image(registry: Registry, seed: str = "app") -> tuple[bytes, str]:
    manifest = fx.image_manifest(seed)
    return manifest, registry.push_manifest(NAME, manifest, tag=seed)


def run(coroutine):
    return asyncio.run(coroutine)


# -- the formats, cross-checked against cosign's own bytes --------------------------------


def test_payload_bytes_are_cosigns():
    # cosign pkg/cosign/obsolete_test.go asserts exactly these bytes for this digest.
    digest = "sha256:4aa3054270f7a70b4528f2064ee90961788e1e1518703592ae4463de3b889dec"
    assert fx.simple_signing_payload(digest, "index.docker.io/namespace/image") == (
        b'{"critical":{"identity":{"docker-reference":"index.docker.io/namespace/image"},'
        b'"image":{"docker-manifest-digest":"sha256:4aa3054270f7a70b4528f2064ee90961788e1e'
        b'1518703592ae4463de3b889dec"},"type":"cosign container image signature"},'
        b'"optional":null}')


def test_real_cosign_payload_is_what_the_builder_writes():
    digest = digest_of(fx.REAL_MANIFEST)
    assert digest == "sha256:634a8f35b5f16dcf4aaa0822adc0b1964bb786fca12f6831de8ddc45e5986a00"
    reference = "192.168.64.2:5000/cosign-signed-single-sample"
    assert fx.simple_signing_payload(digest, reference) == fx.REAL_PAYLOAD


def test_dsse_pae_matches_the_spec_example():
    # secure-systems-lab/dsse protocol.md: PAE("http://example.com/HelloWorld", "hello world")
    from mirror.trust.bundle import pae

    expected = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert pae("http://example.com/HelloWorld", b"hello world") == expected
    assert fx.pae("http://example.com/HelloWorld", b"hello world") == expected


# -- real cosign signatures -----------------------------------------------------------------


def real_registry() -> tuple[Registry, str]:
    registry = Registry()
    digest = registry.push_manifest(NAME, fx.REAL_MANIFEST, fx.OCI_MANIFEST, tag="v1")
    layer = {"mediaType": fx.SIMPLE_SIGNING, "size": len(fx.REAL_PAYLOAD),
             "digest": registry.push_blob(fx.REAL_PAYLOAD),
             "annotations": {fx.SIGNATURE_ANNOTATION: fx.REAL_SIGNATURE}}
    registry.push_signature_manifest(NAME, digest, [layer])
    return registry, digest


def test_real_cosign_signature_verifies():
    registry, digest = real_registry()
    key = parse_key(fx.REAL_KEY, "cosign.pub")
    verdict = run(verify(NAME, digest, registry, [key]))
    der = serialization.load_pem_public_key(fx.REAL_KEY).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert verdict == Verdict("signed", f"signed by key cosign.pub ({key.fingerprint}) at "
                              f"{digest.replace(':', '-')}.sig",
                              key="sha256:" + hashlib.sha256(der).hexdigest(),
                              source=f"{digest.replace(':', '-')}.sig")
    payload_digest = digest_of(fx.REAL_PAYLOAD)
    assert registry.requests == [("manifest", NAME, f"{digest.replace(':', '-')}.sig"),
                                 ("blob", NAME, payload_digest)]


def test_real_cosign_signature_refused_with_another_key():
    registry, digest = real_registry()
    other = parse_key(fx.REAL_OTHER_KEY, "cosign2.pub")
    verdict = run(verify(NAME, digest, registry, [other]))
    tag = digest.replace(":", "-") + ".sig"
    assert verdict.status == "invalid"
    assert verdict.reason == f"signature at {tag} does not verify with key {other}"


def test_real_cosign_signature_copied_to_another_image_is_refused():
    # containers/image's dir-img-cosign-manifest-digest-error: the same signature next to
    # a different manifest (digest 4decc7...).
    registry, signed_digest = real_registry()
    other = "sha256:4decc7c62bd017c89c89dd8fe74a606a7c9cf52e4938310036e412dd4bf2933c"
    layer = json.loads(registry.manifests[(NAME, signed_digest.replace(":", "-") + ".sig")][0])
    registry.push_signature_manifest(NAME, other, layer["layers"])
    verdict = run(verify(NAME, other, registry, [parse_key(fx.REAL_KEY, "cosign.pub")]))
    assert verdict.status == "invalid"
    assert verdict.reason == f"payload is for {signed_digest} not {other}"


# -- tag-based signatures made here, per key type ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tag_signature_verifies_per_key_type(kind):
    registry = Registry()
    _, digest = signed_image(registry)
    registry.sign(NAME, digest, [signer(kind)])
    verdict = run(verify(NAME, digest, registry, [key_of(signer(kind))]))
    assert (verdict.status, verdict.key) == ("signed", signer(kind).fingerprint)
    # Verified from the tag alone: the referrers API is not asked.
    assert [request[0] for request in registry.requests] == ["manifest", "blob"]


@pytest.mark.parametrize("kind", KINDS)
def test_tag_signature_with_wrong_key_is_invalid(kind):
    registry = Registry()
    _, digest = signed_image(registry)
    registry.sign(NAME, digest, [signer(kind, 1)])
    keys = [key_of(signer(kind)), key_of(signer("ecdsa"))]
    verdict = run(verify(NAME, digest, registry, keys))
    tag = digest.replace(":", "-") + ".sig"
    assert verdict.status == "invalid"
    assert verdict.reason == (f"signature at {tag} does not verify with key "
                              f"{keys[0]}, {keys[1]}")
    assert verdict.key is None


def test_tampered_payload_with_its_own_descriptor_does_not_verify():
    registry = Registry()
    _, digest = signed_image(registry)
    one = signer("ecdsa")
    payload = fx.simple_signing_payload(digest)
    tampered = payload.replace(b"registry.example", b"evil.example0000")
    layer = {"mediaType": fx.SIMPLE_SIGNING, "size": len(tampered),
             "digest": registry.push_blob(tampered),
             "annotations": {fx.SIGNATURE_ANNOTATION: fx.b64(one.sign(payload))}}
    registry.push_signature_manifest(NAME, digest, [layer])
    verdict = run(verify(NAME, digest, registry, [key_of(one)]))
    assert verdict.reason.startswith(f"signature at {digest.replace(':', '-')}.sig does not")


def test_payload_blob_not_matching_its_descriptor_is_invalid():
    registry = Registry()
    _, digest = signed_image(registry)
    registry.sign(NAME, digest, [signer("ecdsa")])
    payload_digest = digest_of(fx.simple_signing_payload(digest))
    registry.blobs[payload_digest] = registry.blobs[payload_digest].replace(b"app", b"apq")
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    tag = digest.replace(":", "-") + ".sig"
    served = digest_of(registry.blobs[payload_digest])
    assert verdict == Verdict("invalid", f"{tag} payload has digest {served}, its descriptor "
                              f"says {payload_digest}", refusals=(verdict.reason,))


def test_signature_for_another_digest_is_refused():
    registry = Registry()
    _, digest = signed_image(registry, "app")
    _, other = signed_image(registry, "other")
    registry.sign(NAME, digest, [signer("ed25519")], payload=fx.simple_signing_payload(other))
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ed25519"))]))
    assert verdict.status == "invalid"
    assert verdict.reason == f"payload is for {other} not {digest}"


def test_payload_of_another_type_is_refused():
    registry = Registry()
    _, digest = signed_image(registry)
    payload = fx.simple_signing_payload(digest).replace(b"cosign container image signature",
                                                        b"atomic container signature")
    registry.sign(NAME, digest, [signer("ecdsa")], payload=payload)
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    assert verdict.reason == (f"{digest.replace(':', '-')}.sig payload type is "
                              "'atomic container signature', not "
                              "'cosign container image signature'")


def test_docker_reference_is_not_checked():
    # SIGNATURE_SPEC.md: "The critical.identity.docker-reference field is ignored".
    registry = Registry()
    _, digest = signed_image(registry)
    payload = fx.simple_signing_payload(digest, "docker.io/someone/else")
    registry.sign(NAME, digest, [signer("ecdsa")], payload=payload)
    assert run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))])).signed


def test_payload_field_names_match_case_insensitively_like_go():
    # The spec's own example writes "Docker-manifest-digest"; cosign (Go) accepts it.
    registry = Registry()
    _, digest = signed_image(registry)
    payload = fx.simple_signing_payload(digest).replace(b"docker-manifest-digest",
                                                        b"Docker-manifest-digest")
    registry.sign(NAME, digest, [signer("ecdsa")], payload=payload)
    assert run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))])).signed


def test_legacy_keyless_signature_is_refused_as_unsupported():
    registry = Registry()
    _, digest = signed_image(registry)
    payload = fx.simple_signing_payload(digest)
    layer = {"mediaType": fx.SIMPLE_SIGNING, "size": len(payload),
             "digest": registry.push_blob(payload),
             "annotations": {fx.SIGNATURE_ANNOTATION: fx.b64(signer("ecdsa", 1).sign(payload)),
                             "dev.sigstore.cosign/certificate": "-----BEGIN CERTIFICATE-----"}}
    registry.push_signature_manifest(NAME, digest, [layer])
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    assert verdict.reason == (f"{digest.replace(':', '-')}.sig is a legacy keyless signature "
                              "(certificate annotation), which is not supported; sign with a "
                              "key or a bundle")


def test_second_signature_in_the_manifest_admits():
    registry = Registry()
    _, digest = signed_image(registry)
    registry.sign(NAME, digest, [signer("ecdsa", 1), signer("rsa")])
    verdict = run(verify(NAME, digest, registry, [key_of(signer("rsa"))]))
    tag = digest.replace(":", "-") + ".sig"
    assert (verdict.status, verdict.source) == ("signed", f"{tag} layer 2")


def test_unsigned_image_says_where_it_looked():
    registry = Registry()
    _, digest = signed_image(registry)
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    tag = digest.replace(":", "-") + ".sig"
    assert verdict == Verdict("unsigned", f"no signature at {tag} or in referrers")
    assert registry.requests == [("manifest", NAME, tag), ("referrers", NAME, digest)]


def test_unsigned_without_referrers_api_reads_the_tag_schema():
    registry = Registry(referrers_api=False)
    _, digest = signed_image(registry)
    verdict = run(verify(NAME, digest, registry, []))
    assert verdict.status == "unsigned"
    assert registry.requests[-1] == ("manifest", NAME, digest.replace(":", "-"))


def test_not_a_digest_is_invalid_without_a_request():
    registry = Registry()
    verdict = run(verify(NAME, "latest", registry, []))
    assert verdict == Verdict("invalid", "'latest' is not a sha256 digest")
    assert registry.requests == []


def test_oversized_signature_manifest_is_refused():
    registry = Registry()
    _, digest = signed_image(registry)
    huge = b'{"layers":[],"pad":"' + b"x" * MAX_DOCUMENT + b'"}'
    registry.push_manifest(NAME, huge, tag=digest.replace(":", "-") + ".sig")
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    tag = digest.replace(":", "-") + ".sig"
    assert verdict.reason == (f"signature manifest {tag} is {len(huge)} bytes, over the "
                              f"{MAX_DOCUMENT} byte limit")


def test_oversized_payload_descriptor_is_refused_before_fetching():
    registry = Registry()
    _, digest = signed_image(registry)
    layer = {"mediaType": fx.SIMPLE_SIGNING, "size": MAX_DOCUMENT + 1,
             "digest": "sha256:" + "0" * 64,
             "annotations": {fx.SIGNATURE_ANNOTATION: fx.b64(b"x")}}
    registry.push_signature_manifest(NAME, digest, [layer])
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    assert verdict.status == "invalid" and "over the limit" in verdict.reason
    assert not [request for request in registry.requests if request[0] == "blob"]


def test_oversized_bundle_is_refused_before_fetching():
    registry = Registry()
    _, digest = signed_image(registry)
    bundle = fx.bundle_dsse(signer("ecdsa"), fx.in_toto_statement(digest))
    big = bundle[:-1] + b',"pad":"' + b"x" * MAX_DOCUMENT + b'"}'
    referrer = registry.attach(NAME, digest, big)
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    assert verdict.reason == f"referrer {referrer}: bundle is {len(big)} bytes, over the limit"
    assert ("blob", NAME, digest_of(big)) not in registry.requests


def test_missing_payload_blob_raises_the_fetch_error():
    # An upstream that cannot serve a blob is the caller's error to map, not a verdict.
    registry = Registry()
    _, digest = signed_image(registry)
    registry.sign(NAME, digest, [signer("ecdsa")])
    del registry.blobs[digest_of(fx.simple_signing_payload(digest))]
    with pytest.raises(fx.BlobUnknown):
        run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))


# -- bundles through the referrers API ------------------------------------------------------


@pytest.mark.parametrize("referrers_api", [True, False], ids=["api", "tag-schema"])
@pytest.mark.parametrize("kind", KINDS)
def test_message_signature_bundle_verifies(kind, referrers_api):
    registry = Registry(referrers_api=referrers_api)
    manifest, digest = signed_image(registry)
    referrer = registry.attach(NAME, digest, fx.bundle_message_signature(signer(kind), manifest))
    verdict = run(verify(NAME, digest, registry, [key_of(signer(kind))]))
    assert (verdict.status, verdict.key, verdict.source) == (
        "signed", signer(kind).fingerprint, f"referrer {referrer}")


@pytest.mark.parametrize("kind", KINDS)
def test_dsse_bundle_verifies(kind):
    registry = Registry()
    _, digest = signed_image(registry)
    registry.attach(NAME, digest, fx.bundle_dsse(signer(kind), fx.in_toto_statement(digest)))
    verdict = run(verify(NAME, digest, registry, [key_of(signer(kind))]))
    assert (verdict.status, verdict.key) == ("signed", signer(kind).fingerprint)


def test_dsse_bundle_with_wrong_key_is_invalid():
    registry = Registry()
    _, digest = signed_image(registry)
    referrer = registry.attach(NAME, digest, fx.bundle_dsse(signer("ecdsa", 1),
                                                            fx.in_toto_statement(digest)))
    key = key_of(signer("ecdsa"))
    verdict = run(verify(NAME, digest, registry, [key]))
    assert verdict.reason == f"referrer {referrer}: DSSE signature does not verify with key {key}"


def test_dsse_bundle_with_tampered_statement_is_invalid():
    registry = Registry()
    _, digest = signed_image(registry)
    statement = fx.in_toto_statement(digest)
    bundle = json.loads(fx.bundle_dsse(signer("ecdsa"), statement))
    bundle["dsseEnvelope"]["payload"] = fx.b64(statement.replace(b"{}", b'{"x":1}'))
    registry.attach(NAME, digest, fx.go_json(bundle))
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    assert verdict.status == "invalid" and "DSSE signature does not verify" in verdict.reason


def test_dsse_statement_for_another_digest_is_refused():
    registry = Registry()
    _, digest = signed_image(registry, "app")
    _, other = signed_image(registry, "other")
    referrer = registry.attach(NAME, digest, fx.bundle_dsse(signer("rsa"),
                                                            fx.in_toto_statement(other)))
    verdict = run(verify(NAME, digest, registry, [key_of(signer("rsa"))]))
    assert verdict.reason == f"referrer {referrer}: statement is for {other} not {digest}"


def test_message_signature_for_another_manifest_is_refused():
    registry = Registry()
    _, digest = signed_image(registry, "app")
    other_manifest, other = signed_image(registry, "other")
    referrer = registry.attach(NAME, digest,
                               fx.bundle_message_signature(signer("ecdsa"), other_manifest))
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    assert verdict.reason == f"referrer {referrer}: bundle is for {other} not {digest}"


def test_referrer_with_another_subject_is_refused():
    registry = Registry()
    manifest, digest = signed_image(registry, "app")
    _, other = signed_image(registry, "other")
    # Listed in this digest's tag-schema index but pointing at another subject.
    registry.referrers_api = False
    referrer = registry.attach(NAME, digest, fx.bundle_message_signature(signer("ecdsa"),
                                                                         manifest), subject=other)
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    assert verdict.reason == f"referrer {referrer}: its subject is {other} not {digest}"


def test_attestation_with_another_predicate_is_not_a_signature():
    registry = Registry()
    _, digest = signed_image(registry)
    statement = fx.in_toto_statement(digest, "https://slsa.dev/provenance/v1")
    registry.attach(NAME, digest, fx.bundle_dsse(signer("ecdsa"), statement))
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    assert verdict.status == "unsigned"
    accepted = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))],
                          predicate_types=["https://slsa.dev/provenance/v1"]))
    assert accepted.signed


def test_bad_tag_signature_and_good_bundle_is_signed():
    registry = Registry()
    manifest, digest = signed_image(registry)
    registry.sign(NAME, digest, [signer("ecdsa", 1)])
    registry.attach(NAME, digest, fx.bundle_message_signature(signer("ecdsa"), manifest))
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))]))
    assert verdict.signed and verdict.source.startswith("referrer sha256:")


def test_keyless_bundle_without_keyless_configured_is_invalid():
    registry = Registry()
    digest = "sha256:732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4"
    referrer = registry.attach(NAME, digest, fx.REAL_BUNDLE)
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ecdsa"))],
                         predicate_types=["https://cosign.sigstore.dev/attestation/v1"]))
    assert verdict.reason == (f"referrer {referrer}: bundle is keyless (a Fulcio certificate) "
                              "and keyless verification is not configured")


# -- keyless, with sigstore-python and a trusted root file ---------------------------------

REAL_SUBJECT = "sha256:732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4"
ATTESTATION = "https://cosign.sigstore.dev/attestation/v1"


@pytest.fixture
def trusted_root(tmp_path):
    import sigstore  # noqa: F401  (the keyless extra; scripts/test.sh installs it)
    path = tmp_path / "trusted_root.json"
    path.write_bytes(fx.REAL_TRUSTED_ROOT)
    return path


def test_real_keyless_bundle_verifies_offline(trusted_root):
    keyless = Keyless.load(trusted_root, [Identity("cody@soyland.com",
                                                   "https://github.com/login/oauth")])
    registry = Registry()
    registry.attach(NAME, REAL_SUBJECT, fx.REAL_BUNDLE)
    verdict = run(verify(NAME, REAL_SUBJECT, registry, [], keyless=keyless,
                         predicate_types=[ATTESTATION]))
    assert verdict.status == "signed", verdict.reason
    assert verdict.key == "cody@soyland.com (issuer https://github.com/login/oauth)"


def test_real_keyless_bundle_refused_for_another_identity(trusted_root):
    keyless = Keyless.load(trusted_root, [Identity("someone@example.com",
                                                   "https://github.com/login/oauth")])
    registry = Registry()
    registry.attach(NAME, REAL_SUBJECT, fx.REAL_BUNDLE)
    verdict = run(verify(NAME, REAL_SUBJECT, registry, [], keyless=keyless,
                         predicate_types=[ATTESTATION]))
    assert verdict.status == "invalid"
    assert verdict.reason.endswith(
        ": keyless bundle does not verify: certificate is for cody@soyland.com (issuer "
        "https://github.com/login/oauth), not "
        "someone@example.com (issuer https://github.com/login/oauth)")


def test_real_keyless_bundle_with_flipped_signature_is_refused(trusted_root):
    keyless = Keyless.load(trusted_root, [Identity("cody@soyland.com",
                                                   "https://github.com/login/oauth")])
    bundle = json.loads(fx.REAL_BUNDLE)
    signature = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    signature[-1] ^= 1
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = fx.b64(bytes(signature))
    registry = Registry()
    registry.attach(NAME, REAL_SUBJECT, json.dumps(bundle).encode())
    verdict = run(verify(NAME, REAL_SUBJECT, registry, [], keyless=keyless,
                         predicate_types=[ATTESTATION]))
    assert verdict.status == "invalid"
    assert "keyless bundle does not verify" in verdict.reason


def test_real_keyless_bundle_is_not_for_another_digest(trusted_root):
    keyless = Keyless.load(trusted_root, [Identity("cody@soyland.com",
                                                   "https://github.com/login/oauth")])
    registry = Registry(referrers_api=False)
    _, digest = signed_image(registry)
    referrer = registry.attach(NAME, digest, fx.REAL_BUNDLE, subject=digest)
    verdict = run(verify(NAME, digest, registry, [], keyless=keyless,
                         predicate_types=[ATTESTATION]))
    assert verdict.reason == f"referrer {referrer}: statement is for {REAL_SUBJECT} not {digest}"


@pytest.fixture
def own_sigstore(tmp_path):
    """A Fulcio CA, CT log and Rekor made in the test, and the trusted root naming them."""
    import sigstore  # noqa: F401  (the keyless extra; scripts/test.sh installs it)
    deployment = fx.Sigstore()
    path = tmp_path / "own_trusted_root.json"
    path.write_bytes(deployment.trusted_root())
    return deployment, path


DEV = Identity("dev@example.com", "https://issuer.example")


def test_keyless_signature_from_own_trusted_root_verifies(own_sigstore):
    deployment, root = own_sigstore
    registry = Registry()
    _, digest = signed_image(registry)
    bundle = deployment.sign_dsse(fx.in_toto_statement(digest), DEV.identity, DEV.issuer)
    referrer = registry.attach(NAME, digest, bundle)
    verdict = run(verify(NAME, digest, registry, [], keyless=Keyless.load(root, [DEV])))
    assert verdict == Verdict(
        "signed", f"signed by keyless identity {DEV} in referrer {referrer}",
        key=str(DEV), source=f"referrer {referrer}")


def test_keyless_message_signature_from_own_trusted_root_verifies(own_sigstore):
    deployment, root = own_sigstore
    registry = Registry()
    manifest, digest = signed_image(registry)
    registry.attach(NAME, digest, deployment.sign_message(manifest, DEV.identity, DEV.issuer))
    keyless = Keyless.load(root, [Identity("other@example.com", DEV.issuer), DEV])
    verdict = run(verify(NAME, digest, registry, [], keyless=keyless))
    assert verdict.status == "signed", verdict.reason
    # Signed for another manifest: refused before sigstore-python is asked.
    _, other = signed_image(registry, "other")
    referrer = registry.attach(NAME, other, deployment.sign_message(
        manifest, DEV.identity, DEV.issuer))
    verdict = run(verify(NAME, other, registry, [], keyless=keyless))
    assert verdict.reason == f"referrer {referrer}: bundle is for {digest} not {other}"


def test_keyless_signature_from_another_issuer_is_refused(own_sigstore):
    deployment, root = own_sigstore
    registry = Registry()
    _, digest = signed_image(registry)
    bundle = deployment.sign_dsse(fx.in_toto_statement(digest), DEV.identity,
                                  "https://accounts.evil.example")
    referrer = registry.attach(NAME, digest, bundle)
    verdict = run(verify(NAME, digest, registry, [], keyless=Keyless.load(root, [DEV])))
    assert verdict.reason == (
        f"referrer {referrer}: keyless bundle does not verify: certificate is for "
        f"dev@example.com (issuer https://accounts.evil.example), not {DEV}")


def test_keyless_signature_from_an_untrusted_deployment_is_refused(own_sigstore):
    _, root = own_sigstore
    registry = Registry()
    _, digest = signed_image(registry)
    stranger = fx.Sigstore()
    registry.attach(NAME, digest, stranger.sign_dsse(fx.in_toto_statement(digest),
                                                     DEV.identity, DEV.issuer))
    verdict = run(verify(NAME, digest, registry, [], keyless=Keyless.load(root, [DEV])))
    assert verdict.status == "invalid"
    assert "keyless bundle does not verify: failed to build timestamp certificate chain" \
        in verdict.reason


def test_keyless_signature_for_another_digest_is_refused(own_sigstore):
    deployment, root = own_sigstore
    registry = Registry()
    _, digest = signed_image(registry, "app")
    _, other = signed_image(registry, "other")
    referrer = registry.attach(NAME, digest, deployment.sign_dsse(
        fx.in_toto_statement(other), DEV.identity, DEV.issuer))
    verdict = run(verify(NAME, digest, registry, [], keyless=Keyless.load(root, [DEV])))
    assert verdict.reason == f"referrer {referrer}: statement is for {other} not {digest}"


def test_keyless_bundle_with_a_forged_log_entry_is_refused(own_sigstore):
    deployment, root = own_sigstore
    registry = Registry()
    _, digest = signed_image(registry)
    bundle = json.loads(deployment.sign_dsse(fx.in_toto_statement(digest), DEV.identity,
                                             DEV.issuer))
    entry = bundle["verificationMaterial"]["tlogEntries"][0]
    entry["integratedTime"] = str(int(entry["integratedTime"]) + 1)  # breaks the SET
    registry.attach(NAME, digest, fx.go_json(bundle))
    verdict = run(verify(NAME, digest, registry, [], keyless=Keyless.load(root, [DEV])))
    assert verdict.status == "invalid"
    assert "keyless bundle does not verify: invalid log entry: SET" in verdict.reason


def test_keyless_needs_a_trusted_root_and_an_identity(tmp_path):
    identity = [Identity("a@example.com", "https://issuer.example")]
    with pytest.raises(KeylessNotConfigured, match="needs a trusted root file"):
        Keyless.load(None, identity)
    with pytest.raises(KeylessNotConfigured, match="at least one identity"):
        Keyless.load(tmp_path / "root.json", [])
    import sigstore  # noqa: F401  (the keyless extra; scripts/test.sh installs it)
    bad = tmp_path / "root.json"
    bad.write_text("{}")
    with pytest.raises(KeylessNotConfigured, match=f"{bad}: not a usable trusted root"):
        Keyless.load(bad, identity)


# -- key files ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_key_file_loads_with_openssls_fingerprint(kind, tmp_path):
    path = tmp_path / "cosign.pub"
    path.write_bytes(signer(kind).public_pem)
    key = load_key(path)
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(path), "-outform", "DER"],
                         capture_output=True, check=True, timeout=30).stdout
    assert key.fingerprint == "sha256:" + hashlib.sha256(der).hexdigest()
    assert key.name == str(path)


def test_unsupported_keys_are_refused_naming_the_file(tmp_path):
    p384 = ec.generate_private_key(ec.SECP384R1())
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cases = {
        "p384.pub": (p384.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "ECDSA curve secp384r1 is not supported"),
        "small.pub": (small.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "RSA key of 1024 bits is too small"),
        "private.pem": (p384.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), "not a PEM public key"),
        "garbage.pub": (b"not a key", "not a PEM public key"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(KeyFileError, match=f"^{path}: {message}"):
            load_key(path)
    with pytest.raises(KeyFileError, match="missing.pub: cannot read key file"):
        load_key(tmp_path / "missing.pub")


def test_rsa_key_accepts_pkcs1v15_and_pss():
    message = b"payload"
    for kind in ("rsa", "rsa-pss"):
        key = key_of(signer(kind))
        assert key.verifies(signer(kind).sign(message), message)
        assert not key.verifies(signer(kind).sign(message), message + b"!")


# -- hostile bytes never raise --------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["layers", "mediaType", "digest", "size", "annotations",
                                       "manifests", "artifactType", "subject",
                                       "messageSignature", "dsseEnvelope", "critical",
                                       "verificationMaterial", "payload", "signatures"]),
                      children, max_size=5),
    max_leaves=20)
hostile = st.binary(max_size=300) | json_values.map(lambda value: json.dumps(value).encode())


def hostile_registry(target: str, data: bytes, flip: int) -> tuple[Registry, str]:
    """An image whose signature documents are `data`, with descriptors that match it, so
    the bytes reach the parsers rather than stopping at a digest check."""
    registry = Registry(referrers_api=target != "index")
    manifest, digest = signed_image(registry)
    tag = digest.replace(":", "-") + ".sig"
    if target == "signature manifest":
        registry.push_manifest(NAME, data, tag=tag)
    elif target == "payload":
        registry.sign(NAME, digest, [signer("ed25519")], payload=data)
    elif target == "signature layer":
        # A valid layer with some members replaced by hostile values.
        registry.sign(NAME, digest, [signer("ed25519")])
        layer = json.loads(registry.manifests[(NAME, tag)][0])["layers"][0]
        try:  # hostile bytes that happen to be a JSON object replace the layer's members
            hostile_value = json.loads(data) if data.startswith((b"{", b"[")) else None
        except (ValueError, RecursionError):
            hostile_value = None
        if isinstance(hostile_value, dict):
            layer.update(hostile_value)
        registry.push_signature_manifest(NAME, digest, [hostile_value, layer])
    elif target == "bundle":
        registry.attach(NAME, digest, data)
    elif target == "flipped bundle":
        bundle = bytearray(fx.bundle_message_signature(signer("ed25519"), manifest))
        bundle[flip % len(bundle)] ^= 0x55
        registry.attach(NAME, digest, bytes(bundle))
    elif target == "statement":
        registry.attach(NAME, digest, fx.bundle_dsse(signer("ed25519"), data))
    else:
        registry.push_manifest(NAME, data, fx.OCI_INDEX, tag=digest.replace(":", "-"))
    return registry, digest


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=st.sampled_from(["signature manifest", "payload", "signature layer", "bundle",
                               "flipped bundle", "statement", "index"]),
       data=hostile, flip=st.integers(0, 4000))
def test_hostile_documents_always_give_a_verdict(target, data, flip):
    registry, digest = hostile_registry(target, data, flip)
    verdict = run(verify(NAME, digest, registry, [key_of(signer("ed25519"))]))
    assert isinstance(verdict, Verdict)
    assert verdict.reason
    if verdict.status == "signed":
        # Only a change outside what is signed may still verify: the unauthenticated key
        # hint, or a signature layer's extra members.
        assert target in ("flipped bundle", "signature layer"), verdict
        if target == "flipped bundle":
            bundle = next(blob for blob in registry.blobs.values() if b"messageSignature" in blob)
            original = fx.bundle_message_signature(signer("ed25519"), fx.image_manifest())
            assert json.loads(bundle)["messageSignature"] == \
                json.loads(original)["messageSignature"]
            assert json.loads(bundle)["mediaType"] == fx.BUNDLE
    else:
        assert verdict.status in ("invalid", "unsigned")


@settings(max_examples=200, deadline=None)
@given(document=json_values)
def test_hostile_bundles_are_refused_not_raised(document):
    from mirror.trust.bundle import parse_bundle, verify_with_keys
    from mirror.trust.formats import Refused

    raw = json.dumps(document).encode()
    try:
        bundle = parse_bundle(raw)
        verify_with_keys(bundle, "sha256:" + "a" * 64, [key_of(signer("ecdsa"))])
    except Refused:
        pass


def test_module_names_the_formats():
    assert cosign.signature_tag("sha256:" + "ab" * 32) == "sha256-" + "ab" * 32 + ".sig"
    assert cosign.SIMPLE_SIGNING_MEDIA_TYPE == fx.SIMPLE_SIGNING
    assert cosign.BUNDLE_MEDIA_TYPE == fx.BUNDLE
