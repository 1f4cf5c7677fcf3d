"""Platforms in `[[policy.rules]]` `platforms`: parsing what a platform team writes
("linux/amd64", "linux/arm/v7"), and reading what an index offers and an image's config
says, with containerd's normalisation (arm64 without a variant is v8, arm is v7)."""

from __future__ import annotations

import re
from typing import NamedTuple

from ..config import ConfigError

OS = {"linux", "windows", "darwin", "freebsd", "netbsd", "openbsd", "solaris", "illumos",
      "aix", "android", "dragonfly", "ios", "plan9", "js", "wasip1"}
ARCHITECTURES = {"amd64", "arm64", "arm", "386", "ppc64le", "ppc64", "s390x", "riscv64",
                 "mips", "mipsle", "mips64", "mips64le", "loong64", "wasm"}
# What people write for what OCI calls it (the image spec uses Go's GOARCH names).
ARCHITECTURE_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64",
                        "armhf": "arm", "armel": "arm", "i386": "386", "i686": "386"}
# containerd's normalisation: an arm64 image without a variant is v8, an arm one v7.
DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


class Platform(NamedTuple):
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in self if p)

    def covers(self, other: Platform) -> bool:
        """Whether this allowed platform admits `other` (no variant here: any variant)."""
        return (self.os, self.architecture) == (other.os, other.architecture) and \
            (not self.variant or self.variant == variant_of(other))


def variant_of(platform: Platform) -> str:
    return platform.variant or DEFAULT_VARIANT.get(platform.architecture, "")



def parse_platform(text: str, where: str) -> Platform:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"{where}: {text!r} is not a platform: write os/architecture or "
                          "os/architecture/variant, like \"linux/amd64\" or \"linux/arm/v7\"")
    os_, architecture = parts[0], parts[1]
    if os_ not in OS:
        raise ConfigError(f"{where}: {text!r}: unknown operating system {os_!r} (OCI uses Go's "
                          f"names: {', '.join(sorted(OS))})")
    if architecture in ARCHITECTURE_ALIASES:
        raise ConfigError(f"{where}: {text!r}: OCI calls {architecture} "
                          f"{ARCHITECTURE_ALIASES[architecture]!r}; write "
                          f"\"{os_}/{ARCHITECTURE_ALIASES[architecture]}\"")
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"{where}: {text!r}: unknown architecture {architecture!r} (OCI "
                          f"uses Go's names: {', '.join(sorted(ARCHITECTURES))})")
    variant = parts[2] if len(parts) == 3 else ""
    if variant and not re.fullmatch(r"v[0-9]+", variant):
        raise ConfigError(f"{where}: {text!r}: a variant is v<number>, like v7 or v8")
    return Platform(os_, architecture, variant)


IMAGE_CONFIGS = {"application/vnd.oci.image.config.v1+json",
                 "application/vnd.docker.container.image.v1+json"}


def offered(index: dict) -> list[Platform]:
    """The platforms an index lists (attestations' unknown/unknown is none)."""
    found = []
    for entry in index["manifests"]:
        platform = platform_of(entry.get("platform")) if isinstance(entry, dict) else None
        if platform is not None:
            found.append(platform)
    return found


def platform_of(described: object) -> Platform | None:
    if not isinstance(described, dict):
        return None
    os_, architecture = described.get("os"), described.get("architecture")
    if not isinstance(os_, str) or not isinstance(architecture, str) or \
            "unknown" in (os_, architecture) or not os_ or not architecture:
        return None
    variant = described.get("variant")
    return Platform(os_, architecture, variant if isinstance(variant, str) else "")
