"""upstream: talking to the registries the mirror pulls from — one client per upstream,
its authentication, redirects, limits, and the mapping of every failure to a RegistryError.

No aiohttp client exception leaves this folder. It imports `errors`, `metrics`, `config`
and the in-memory tier of `storage/` (for tokens), nothing from `api/` or `cache/`.
"""
