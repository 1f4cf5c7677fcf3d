"""Upstream credentials stay home: a hostile token realm or CDN, listening on another
loopback address (127.0.0.2) or on another port of the upstream's own host, never receives
an Authorization header or the password, through a real mirror with username and password
configured; and one repository's challenge never decides where another's token comes from.

The upstream is the test registry behind the fault proxy; the proxy's canned answers play
the upstream naming the hostile realm (a 401) or sending a blob to the hostile CDN (307).
"""

from __future__ import annotations

import json

import pytest
from yarl import URL

from mirror import config as cfg
from tests.support.hostile import Hostile

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
USER, PASSWORD = "reader", "readpass"


def token_host(upstream) -> str:
    realm = URL(upstream.token_url)
    return f"{realm.host}:{realm.port}"


@pytest.fixture(params=["127.0.0.2", "127.0.0.1"], ids=["other-host", "same-host-other-port"])
async def hostile(request, aiohttp_server):
    return await Hostile.serve(aiohttp_server, request.param)


@pytest.fixture
async def authed(start_mirror, upstream, tmp_path):
    """A mirror logging in to the upstream as reader; the token server is its realm host."""
    return await start_mirror(root=tmp_path / "authed", upstreams=(
        cfg.Upstream("docker.io", upstream.url, default=True, username=USER, password=PASSWORD,
                     realm_hosts=(token_host(upstream),)),))


async def get(http, url):
    async with http.get(url, headers=ACCEPT) as resp:
        return resp.status, await resp.read()


def hostile_realm(upstream, hostile, repository: str) -> None:
    """The upstream answers `repository`'s next manifest request with a 401 naming the
    hostile realm, as a compromised upstream (or one repository's odd answer) could."""
    upstream.proxy.status(401, headers={
        "WWW-Authenticate": f'Bearer realm="{hostile.url}/token",service="evil",'
                            f'scope="repository:{repository}:pull"'},
        match=f"/v2/{repository}/manifests/", times=1)


def scopes_asked(upstream) -> list[tuple[str | None, str]]:
    return [(r["username"], s) for r in upstream.tokens.requests for s in r["scopes"]]


async def test_a_hostile_realm_gets_no_credentials_and_no_other_repository(authed, http,
                                                                           upstream, hostile):
    app = upstream.images["team/app"]
    # The upstream's own challenge first: the listed realm gets the credentials.
    status, body = await get(http, f"{authed.url}/v2/private/secret/manifests/1")
    assert (status, body) == (200, upstream.images["private/secret"].manifest)
    assert (USER, "repository:private/secret:pull") in scopes_asked(upstream)

    hostile_realm(upstream, hostile, "team/app")
    status, body = await get(http, f"{authed.url}/v2/team/app/manifests/2.0")
    # The hostile realm was asked for team/app (the upstream said so), anonymously; the
    # registry refuses its token.
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
    assert hostile.paths() and all(p.startswith("/token?") for p in hostile.paths())
    assert all("team%2Fapp" in p or "team/app" in p for p in hostile.paths())
    # Another repository's token still comes from the upstream's realm, up front: team/app's
    # challenge is team/app's alone.
    asked = len(hostile.seen)
    status, body = await get(http, f"{authed.url}/v2/alpine/manifests/3.19")
    assert (status, body) == (200, upstream.images["library/alpine"].manifest)
    assert len(hostile.seen) == asked
    assert (USER, "repository:library/alpine:pull") in scopes_asked(upstream)

    # Next time the registry's own challenge for team/app takes over, with the login.
    status, body = await get(http, f"{authed.url}/v2/team/app/manifests/2.0")
    assert (status, body) == (200, app.manifest)
    assert (USER, "repository:team/app:pull") in scopes_asked(upstream)
    assert hostile.credentials_seen(USER, PASSWORD) == []


async def test_a_hostile_first_challenge_never_gets_the_credentials(authed, http, upstream,
                                                                    hostile):
    hostile_realm(upstream, hostile, "team/app")
    status, _ = await get(http, f"{authed.url}/v2/team/app/manifests/2.0")
    assert status == 403  # the hostile realm's token is no good at the registry
    assert hostile.paths() and all(p.startswith("/token?") for p in hostile.paths())
    # A scope not challenged yet borrows that first realm, but its token is refused and
    # the repository's own challenge takes over: the password still never goes there.
    status, body = await get(http, f"{authed.url}/v2/private/secret/manifests/1")
    assert (status, body) == (200, upstream.images["private/secret"].manifest)
    assert hostile.credentials_seen(USER, PASSWORD) == []
    assert (USER, "repository:private/secret:pull") in scopes_asked(upstream)


async def test_a_blob_redirect_to_a_hostile_cdn_carries_no_authorization(authed, http, upstream,
                                                                         hostile):
    alpine = upstream.images["library/alpine"]
    digest = alpine.layer_digests[0]
    # A token first, so the blob request to the upstream carries "Authorization: Bearer".
    assert (await get(http, f"{authed.url}/v2/alpine/manifests/3.19"))[0] == 200
    hostile.blobs[digest] = alpine.blobs[digest]
    upstream.proxy.status(307, headers={"Location": f"{hostile.url}/cdn/{digest}?sig=a%2Fb"},
                          match=f"/blobs/{digest}", method="GET")
    status, body = await get(http, f"{authed.url}/v2/alpine/blobs/{digest}")
    assert (status, body) == (200, alpine.blobs[digest])
    assert hostile.paths() == [f"/cdn/{digest}?sig=a%2Fb"]  # followed, byte-exact
    assert hostile.credentials_seen(USER, PASSWORD) == []
    assert sum(r.status == 307 for r in upstream.proxy.records) == 1


async def test_a_cdns_own_401_is_never_learned_as_a_realm(authed, http, upstream, hostile):
    alpine = upstream.images["library/alpine"]
    digest = alpine.layer_digests[0]
    assert (await get(http, f"{authed.url}/v2/alpine/manifests/3.19"))[0] == 200
    hostile.challenge_on_cdn = True
    upstream.proxy.status(307, headers={"Location": f"{hostile.url}/cdn/{digest}"},
                          match=f"/blobs/{digest}", method="GET")
    status, body = await get(http, f"{authed.url}/v2/alpine/blobs/{digest}")
    assert status == 503
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNAVAILABLE" and "refused it with 401" in error["message"]
    # Not a realm: nobody asked the CDN for a token, and the next repository's token
    # comes from the upstream's realm as before.
    assert hostile.paths() == [f"/cdn/{digest}"]
    status, body = await get(http, f"{authed.url}/v2/team/app/manifests/2.0")
    assert (status, body) == (200, upstream.images["team/app"].manifest)
    assert hostile.paths() == [f"/cdn/{digest}"]
    assert hostile.credentials_seen(USER, PASSWORD) == []
    assert (USER, "repository:team/app:pull") in scopes_asked(upstream)
