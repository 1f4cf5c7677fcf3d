"""The push-name policy: which names a hosted repository may take, so a push never shadows
the cache.

A hosted repository answers the requests that name no upstream — `/v2/<name>/...` with no
`?ns=` and no path prefix — instead of the default upstream. So a push may never take a
name under which the default upstream serves those same requests:

- `<upstream>/...` for every configured upstream name or alias (`docker.io/x`, `hub/x`,
  `quay.io/x`): those names route to that upstream.
- `library/...` when the default upstream adds `library/` (Docker Hub): its official images.
- A name the cache already holds from the default upstream, by the name that upstream
  serves it under. On Docker Hub a single-segment name means `library/<name>`, so
  `newhello` may be hosted only while the cache holds no `library/newhello`; once hosted,
  `/v2/newhello/...` is answered here and never upstream, while `/v2/library/newhello`,
  `?ns=docker.io` and `/hub/v2/...` stay Docker Hub's.
- With `hosted.prefixes` set, only names under one of them.

The first two hold for a repository that is already hosted too (one made before these rules
is neither served nor pushed to); the cache rule is asked only before a repository exists,
since from then on its requests never reach the upstream.
"""

from __future__ import annotations

from .. import config as cfg
from ..errors import Denied, NameUnknown, Unsupported
from ..reference import Router
from ..storage.index import Index

HOW_INSTEAD = ("push under a name of your own instead (e.g. team/{leaf}), or reserve the "
               "names that may be pushed with hosted.prefixes")


def reserved(name: str, router: Router) -> str | None:
    """Why `name` can never be a hosted repository here, or None if it can be."""
    first, _, rest = name.partition("/")
    if rest and first in router.by_prefix:
        return (f"{name} is under {first}/, which this mirror serves from upstream "
                f"{router.by_prefix[first].name}")
    default = router.default
    if rest and first == "library" and default is not None and default.adds_library:
        return (f"{name} is in library/, the official images of upstream {default.name}, "
                "which this mirror serves to every client from there")
    return None


def check_name(name: str, config: cfg.Hosted, router: Router, exists: bool) -> None:
    """The rules that need no lookup: Denied or Unsupported, with the reason and what to do."""
    if (reason := reserved(name, router)) is not None:
        raise Denied(f"{reason}; {_instead(name)}", detail={"name": name})
    if exists:
        return
    if not config.enabled:
        raise Unsupported(f"pushing is disabled here (hosted.enabled = false); {name} is "
                          "served from upstream registries only")
    if config.prefixes and not any(name.startswith(p) for p in config.prefixes):
        raise Denied(f"{name} may not be hosted here; allowed prefixes: "
                     + ", ".join(config.prefixes), detail={"name": name})


async def check_not_cached(name: str, router: Router, index: Index) -> None:
    """Denied if the cache holds `name` from the default upstream (for a new repository)."""
    try:
        route = router.route(name)
    except NameUnknown:
        return  # no default upstream: nothing could be shadowed
    if not route.upstream.default or not await index.has_repository(route.catalog_name):
        return
    upstream = route.upstream.name
    if route.name != name:  # newhello on Docker Hub is library/newhello
        held = f"{name} means {route.name} on upstream {upstream}, which this mirror caches"
    else:
        held = f"{name} is already cached from upstream {upstream}"
    raise Denied(f"{held}; a hosted {name} would hide its cached tags from every client: "
                 f"{_instead(name)}", detail={"name": name, "cached": route.name})


def _instead(name: str) -> str:
    return HOW_INSTEAD.format(leaf=name.rpartition("/")[2])
