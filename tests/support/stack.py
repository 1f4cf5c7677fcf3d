"""The whole fake upstream behind one object: token server, registry, images, fault proxy.

`Upstream` owns the order things start in (the token server first, because the registry's
config names its URL and certificate; then the registry; then the seed images, pushed
straight to the registry; the fault proxy last, in front of it) and the reverse order they
stop in. The mirror under test is pointed at `url` (the proxy), so every byte it fetches
can be counted or damaged; tests that need the untouched registry use `registry_url`.
"""

from __future__ import annotations

from pathlib import Path

from . import images as imagelib
from .faultproxy import FaultProxy
from .images import Image
from .registry import Registry
from .serverthread import ServerThread
from .tokens import TokenServer


class Upstream:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.thread = ServerThread("upstream-servers")
        self.tokens: TokenServer
        self.registry: Registry
        self.proxy: FaultProxy
        self.images: dict[str, Image] = {}

    def start(self) -> "Upstream":
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self.thread.start()
            self.tokens = TokenServer(self.directory).start(self.thread)
            self.registry = Registry(self.directory / "registry", self.tokens).start()
            self.images = imagelib.seed(self.registry, self.tokens)
            self.proxy = FaultProxy(self.registry.url).start(self.thread)
        except BaseException:
            self.stop()  # a half-started stack must not leak its registry process
            raise
        return self

    def stop(self) -> None:
        # The proxy and token server die with their thread; the registry is a process.
        self.thread.stop()
        if hasattr(self, "registry"):
            self.registry.stop()

    def __enter__(self) -> "Upstream":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Where the mirror should point: the fault proxy in front of the registry."""
        return self.proxy.url

    @property
    def registry_url(self) -> str:
        return self.registry.url

    @property
    def token_url(self) -> str:
        """The token endpoint (the realm the registry advertises), not behind the proxy."""
        return self.tokens.realm

    def reset(self) -> None:
        """Per-test reset: no faults, no stalls, empty counters, proxy up."""
        self.proxy.reset()
        self.tokens.reset()
        self.tokens.expires_in = 300

    # Changing the upstream mid-test (pushes go straight to the registry, uncounted).

    def push_image(self, name: str, tag: str, seed: str | int, **kwargs) -> Image:
        return imagelib.push_image(self.registry, self.tokens, name, tag, seed, **kwargs)

    def tag_image(self, image: Image, tag: str) -> None:
        imagelib.tag_image(self.registry, self.tokens, image, tag)

    def delete_tag(self, name: str, tag: str) -> None:
        imagelib.delete_tag(self.registry, self.tokens, name, tag)

    def delete_manifest(self, name: str, digest: str) -> None:
        imagelib.delete_manifest(self.registry, self.tokens, name, digest)
