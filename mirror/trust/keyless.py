"""Keyless (Fulcio certificate) bundles, checked offline by sigstore-python against a trusted root.

A keyless bundle carries a short-lived Fulcio certificate instead of a key hint; whether it
admits an image depends on who the certificate names (the signer's identity: an email or
a workflow URI) and which OIDC issuer vouched for it. sigstore-python (PyPI `sigstore`,
4.x) checks all of it offline from a `trusted_root.json` the site brings (the
`dev.sigstore.trustedroot.v1.TrustedRoot` document, e.g. from `sigstore/root-signing` or
its own deployment): the certificate chain to a Fulcio CA, the embedded SCT against a CT
log key, the Rekor entry's inclusion proof and signed checkpoint against a Rekor key, and
that the signature was made while the certificate was valid. `sigstore.verify.Verifier(
trusted_root=TrustedRoot.from_file(path))` opens no connection: cosign's own public-good
fixture verifies here with no network, and so do bundles from a deployment the tests build
themselves (their own CA, CT log and Rekor keys in their own trusted root), which is what
an air-gapped site with a private Sigstore has. About 5 ms per bundle on our machines.

The package is optional: without it, or without a trusted root, `Keyless.load` raises
`KeylessNotConfigured` saying what is missing, and a keyless bundle met during
verification is refused with that reason instead of being admitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .bundle import COSIGN_SIGN_PREDICATE, Bundle, Envelope, check_message_digest, check_statement
from .formats import Refused

OIDC_ISSUER = "1.3.6.1.4.1.57264.1.1"


class KeylessNotConfigured(Exception):
    """Keyless verification was asked for without sigstore-python or a trusted root."""


@dataclass(frozen=True)
class Identity:
    """One accepted signer: the certificate's SAN (`identity`) and its OIDC `issuer`."""

    identity: str
    issuer: str

    def __str__(self) -> str:
        return f"{self.identity} (issuer {self.issuer})"


class Keyless:
    """Checks keyless bundles against one trusted root and a list of accepted identities."""

    def __init__(self, verifier: Any, policy: Any, identities: Sequence[Identity]):
        self._verifier = verifier
        self._policy = policy
        self.identities = tuple(identities)

    @classmethod
    def load(cls, trusted_root: str | Path | None, identities: Iterable[Identity]) -> Keyless:
        """Read the trusted root once; `KeylessNotConfigured` says what is missing."""
        identities = tuple(identities)
        if trusted_root is None:
            raise KeylessNotConfigured("keyless verification needs a trusted root file "
                                       "(trusted_root.json); none is configured")
        if not identities:
            raise KeylessNotConfigured("keyless verification needs at least one identity "
                                       "and issuer to accept")
        try:
            from sigstore.models import TrustedRoot
            from sigstore.verify import Verifier, policy
        except ImportError:
            raise KeylessNotConfigured("keyless verification needs the sigstore package "
                                       "(pip install 'sigstore>=4.0')") from None
        try:
            root = TrustedRoot.from_file(str(trusted_root))
        except Exception as error:  # sigstore raises pydantic, OSError and its own errors
            raise KeylessNotConfigured(f"{trusted_root}: not a usable trusted root "
                                       f"({type(error).__name__}: {error})") from None
        rules = [policy.Identity(identity=i.identity, issuer=i.issuer) for i in identities]
        return cls(Verifier(trusted_root=root), policy.AnyOf(rules), identities)

    def verify(self, bundle: Bundle, digest: str,
               predicate_types: Iterable[str] = (COSIGN_SIGN_PREDICATE,)) -> str:
        """The accepted identities (as text) if `bundle` signs `digest`, else `Refused`."""
        from sigstore.hashes import Hashed
        from sigstore.models import Bundle as SigstoreBundle
        from sigstore_models.common.v1 import HashAlgorithm

        try:
            parsed = SigstoreBundle.from_json(bundle.raw)
        except Exception as error:  # the bundle is network input: any failure is a refusal
            raise Refused(f"keyless bundle does not parse ({_short(error)})") from None
        content = bundle.content
        try:
            if isinstance(content, Envelope):
                payload_type, payload = self._verifier.verify_dsse(parsed, self._policy)
            else:
                check_message_digest(content, digest)
                hashed = Hashed(algorithm=HashAlgorithm.SHA2_256, digest=content.digest)
                self._verifier.verify_artifact(hashed, parsed, self._policy)
        except Refused:
            raise
        except Exception as error:  # VerificationError, and whatever hostile bytes provoke
            reason = _short(error)
            if "policies succeeded" in reason:  # sigstore's AnyOf: no identity matched
                reason = (f"certificate is for {_names(parsed)}, not "
                          + " or ".join(str(identity) for identity in self.identities))
            raise Refused(f"keyless bundle does not verify: {reason}") from None
        if isinstance(content, Envelope):
            check_statement(payload_type, payload, digest, predicate_types)
        return " or ".join(str(identity) for identity in self.identities)


def _names(parsed: Any) -> str:
    """Who the certificate names (SANs and OIDC issuer), to tell a refused signer who they are."""
    from cryptography import x509

    try:
        extensions = parsed.signing_certificate.extensions
        names = [str(name.value) for name in
                 extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    except Exception:  # a certificate without SANs fails verification anyway
        return "an unnamed signer"
    try:
        # Fulcio's OIDC issuer extension (v1: the raw string), sigstore's policy.OIDCIssuer.
        issuer = extensions.get_extension_for_oid(x509.ObjectIdentifier(OIDC_ISSUER)).value
        names[-1] += f" (issuer {issuer.value.decode(errors='replace')})"
    except Exception:
        pass
    return ", ".join(names) or "an unnamed signer"


def _short(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."
