"""The media types of manifests, as registries and clients name them."""

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"
LIST_TYPES = {DOCKER_LIST, OCI_INDEX}
# What a client that states no preference gets, and what a fetch by digest asks for: a
# digest names one manifest, and Docker Hub answers 404 to a digest whose type is not accepted.
ALL_TYPES = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, OCI_ARTIFACT,
             DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1]
