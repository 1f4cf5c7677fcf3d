"""The byte forms signatures arrive in, parsed defensively: JSON objects, base64, digests.

Everything here reads bytes a registry sent, so every failure is one typed exception,
`Malformed` (a `Refused`: a signature that cannot admit the image), whose message becomes
the reason of an `invalid` verdict; nothing else escapes. Sizes are bounded before
anything is parsed (`MAX_DOCUMENT`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any

# A signature manifest, a referrers index, a simple-signing payload or a bundle is a few
# KiB (cosign's bundles with a certificate and an inclusion proof are ~5 KiB); anything
# over 1 MiB is refused before it is parsed.
MAX_DOCUMENT = 1024 * 1024

# The OCI image-spec's registered sha256 form (descriptor.md "Digests"); cosign's tag
# scheme and the referrers API both work on it.
DIGEST = re.compile(r"sha256:[a-f0-9]{64}")


class Refused(Exception):
    """A signature that does not admit the image; the message is the reason, for humans."""


class Malformed(Refused):
    """Bytes from the network that are not what the format says they must be."""


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """Parse `data` as one JSON object no larger than MAX_DOCUMENT."""
    if len(data) > MAX_DOCUMENT:
        raise Malformed(f"{what} is {len(data)} bytes, over the {MAX_DOCUMENT} byte limit")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as error:
        # ValueError covers UnicodeDecodeError and JSONDecodeError.
        raise Malformed(f"{what} is not JSON ({_short(error)})") from None
    if not isinstance(value, dict):
        raise Malformed(f"{what} is not a JSON object")
    return value


def member(document: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """`document[key]`, which must exist and be of `kind`."""
    value = document.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Malformed(f"{what} has no {kind.__name__} {key!r}")
    return value


def base64_bytes(text: Any, what: str) -> bytes:
    """Decode base64 as protobuf's JSON mapping reads it: standard or URL-safe, padded or not."""
    if not isinstance(text, str) or not text:
        raise Malformed(f"{what} is not a base64 string")
    if len(text) > 4 * MAX_DOCUMENT // 3 + 4:
        raise Malformed(f"{what} is over the {MAX_DOCUMENT} byte limit")
    text = text.strip().replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed(f"{what} is not valid base64") from None


def one_of(value: Any, names: frozenset[str] | set[str]) -> bool:
    """`value in names` for a value from JSON, which may be an (unhashable) list or object."""
    return isinstance(value, str) and value in names


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor_digest(descriptor: Any, what: str) -> str:
    """The `digest` of an OCI descriptor, which must be a sha256 digest."""
    if not isinstance(descriptor, dict):
        raise Malformed(f"{what} is not a descriptor object")
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise Malformed(f"{what} has no sha256 digest")
    return digest


def checked_blob(data: bytes, descriptor: dict[str, Any], what: str) -> bytes:
    """`data` if it is exactly what `descriptor` names (digest and, when given, size)."""
    digest = descriptor_digest(descriptor, what)
    if len(data) > MAX_DOCUMENT:
        raise Malformed(f"{what} is {len(data)} bytes, over the {MAX_DOCUMENT} byte limit")
    size = descriptor.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size != len(data):
        raise Malformed(f"{what} is {len(data)} bytes, its descriptor says {size}")
    if digest_of(data) != digest:
        raise Malformed(f"{what} has digest {digest_of(data)}, its descriptor says {digest}")
    return data


def find_key(document: dict[str, Any], key: str) -> Any:
    """The value of the last member whose name matches `key` case-insensitively.

    cosign decodes the simple-signing payload with Go's encoding/json, which matches
    field names case-insensitively and lets a later member overwrite an earlier one; the
    spec's own example writes `Docker-manifest-digest`. Reading it the same way keeps
    every payload cosign accepts acceptable here, and no other.
    """
    matches = [value for name, value in document.items() if name.lower() == key.lower()]
    return matches[-1] if matches else None


def _short(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 80 else text[:77] + "..."
