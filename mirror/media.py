"""The media types of manifests, as registries and clients name them, and what a manifest
refers to."""

import json
import re

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"
LIST_TYPES = {DOCKER_LIST, OCI_INDEX}
DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")  # as reference.parse_digest
# What a client that states no preference gets, and what a fetch by digest asks for: a
# digest names one manifest, and Docker Hub answers 404 to a digest whose type is not accepted.
ALL_TYPES = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, OCI_ARTIFACT,
             DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1]


def references(body: bytes) -> list[str]:
    """The digests a manifest points to: an index's manifests, an image's config and layers
    (and its subject is not one: a referrer does not keep its subject alive)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to decode
        return []
    if not isinstance(document, dict):
        return []
    found = []
    for key in ("manifests", "layers", "blobs"):
        entries = document.get(key)
        if isinstance(entries, list):
            found += [e["digest"] for e in entries
                      if isinstance(e, dict) and isinstance(e.get("digest"), str)]
    config = document.get("config")
    if isinstance(config, dict) and isinstance(config.get("digest"), str):
        found.append(config["digest"])
    for layer in document.get("fsLayers", []) if isinstance(document.get("fsLayers"), list) else []:
        if isinstance(layer, dict) and isinstance(layer.get("blobSum"), str):
            found.append(layer["blobSum"])  # schema1
    # Only what is a digest: a hostile manifest's "../../etc" must never reach the ledger
    # (or anything that turns a digest into a path).
    return [d for d in found if DIGEST.fullmatch(d)]
