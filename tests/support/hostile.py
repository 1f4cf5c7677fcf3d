"""A hostile server that records everything it is sent: a token realm or a CDN an upstream
points the mirror at, to prove which credentials would have leaked there.

It answers `/token` like a token service (a token of its own), `/cdn/...` with the bytes a
test put in `blobs` (or, with `challenge_on_cdn`, the way a CDN can answer itself: 401 with
a Bearer challenge naming its own realm), and anything else 404. It runs on the test's
event loop at any loopback address (127.0.0.2 by default: "another host"), port 0:
`Hostile.serve(aiohttp_server, host)` with pytest-aiohttp's fixture, which also closes it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Seen:
    method: str
    path: str  # raw path and query
    headers: dict[str, str]


class Hostile:
    def __init__(self, host: str = "127.0.0.2") -> None:
        self.host = host
        self.seen: list[Seen] = []
        self.blobs: dict[str, bytes] = {}  # path under /cdn/ -> body
        self.challenge_on_cdn = False
        self.url = ""

    @classmethod
    async def serve(cls, aiohttp_server, host: str = "127.0.0.2") -> Hostile:
        """A Hostile on `host`, served (and closed after the test) by `aiohttp_server`."""
        hostile = cls(host)
        server = await aiohttp_server(hostile.app(), host=host)
        hostile.url = f"http://{host}:{server.port}"
        return hostile

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers)))
        if request.path == "/token":
            return web.json_response({"token": "hostile-token", "expires_in": 300})
        if request.path.startswith("/cdn/"):
            if self.challenge_on_cdn:
                return web.Response(status=401, headers={
                    "WWW-Authenticate": f'Bearer realm="{self.url}/token",service="cdn"'})
            body = self.blobs.get(request.path.removeprefix("/cdn/"))
            if body is not None:
                return web.Response(body=body, content_type="application/octet-stream")
        return web.Response(status=404)

    def credentials_seen(self, username: str, password: str) -> list[str]:
        """Every trace of credentials that reached this server (empty: none did)."""
        pair = base64.b64encode(f"{username}:{password}".encode()).decode()
        found = []
        for s in self.seen:
            if "Authorization" in s.headers or "authorization" in {k.lower() for k in s.headers}:
                found.append(f"{s.method} {s.path}: Authorization header")
            text = s.path + " " + " ".join(f"{k}: {v}" for k, v in s.headers.items())
            for needle in (password, pair):
                if needle in text:
                    found.append(f"{s.method} {s.path}: {needle!r}")
        return found

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]
