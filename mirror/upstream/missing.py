"""What the mirror says when an upstream has no such thing: the words for its 404 (and for
the 401 with which Docker Hub answers a repository that does not exist).

The message is decided from what the upstream said. A 404 names what was asked for: a tag
(`team/app:1.0`), a manifest by digest, a blob, or the repository itself when the body's
OCI error code is NAME_UNKNOWN. Distribution answers MANIFEST_UNKNOWN for a missing tag
and (without auth) for a missing repository alike; Docker Hub answers a missing tag of a
repository that exists with 404 MANIFEST_UNKNOWN and a missing repository with 401, never
404 (PROTOCOL.md), so a 401 is "no such repository, or a private one". A HEAD's 404 has no
body: the request alone decides.
"""

from __future__ import annotations

import json

import aiohttp

# A 404's error JSON is small; a body past this is not one worth reading.
ERROR_BODY_LIMIT = 64 << 10


async def error_code(resp: aiohttp.ClientResponse) -> str | None:
    """The first OCI error code in an error response's body (`MANIFEST_UNKNOWN`, ...)."""
    try:
        body = b""
        while len(body) < ERROR_BODY_LIMIT:  # read() returns what has arrived so far
            chunk = await resp.content.read(ERROR_BODY_LIMIT - len(body))
            if not chunk:
                break
            body += chunk
        code = json.loads(body)["errors"][0]["code"]
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, LookupError, TypeError,
            RecursionError):
        return None  # no body (HEAD), not JSON, not OCI errors: the request alone decides
    return code[:40] if isinstance(code, str) else None


def unknown(upstream: str, name: str, path: str, code: str | None) -> str:
    """The message for a 404 from `upstream` to the request for `path` in repository `name`."""
    said = f" (it answered 404 {code})" if code else " (it answered 404)"
    what, _, reference = path.partition("?")[0].removeprefix(f"/v2/{name}/").partition("/")
    if code == "NAME_UNKNOWN" or what == "tags":
        return f"repository {name} is not known to upstream {upstream}{said}"
    if what == "manifests" and reference:
        if ":" in reference:  # a digest; a tag has no colon
            return f"manifest {name}@{reference} is not known to upstream {upstream}{said}"
        return f"tag {name}:{reference} is not known to upstream {upstream}{said}"
    if what == "blobs" and reference:
        return f"blob {reference} of {name} is not known to upstream {upstream}{said}"
    return f"{name} is not known to upstream {upstream}{said}"


def refused(upstream: str, name: str, username: str | None) -> str:
    """The message for an upstream's 401 or 403 on repository `name`."""
    if username:
        return (f"upstream {upstream} refused access to {name}: it has no such repository, "
                f"or user {username} may not pull it")
    return (f"upstream {upstream} refused access to {name}: it has no such repository (Docker "
            f"Hub answers 401 for those), or it is private: then set username and password "
            f"for upstream {upstream}")
