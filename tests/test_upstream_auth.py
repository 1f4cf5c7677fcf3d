"""The upstream's bearer-token flow: anonymous, with credentials, tokens reused until expiry."""

import json

from yarl import URL

from tests.conftest import fetched

ACCEPT = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}


def token_host(upstream) -> str:
    """The test token server as a realm_hosts entry: it listens on another port than the
    registry, so it gets the credentials only when listed (as auth.docker.io is for Hub)."""
    realm = URL(upstream.token_url)
    return f"{realm.host}:{realm.port}"


async def get(http, url):
    async with http.get(url, headers=ACCEPT) as resp:
        return resp.status, await resp.read()


async def test_token_is_fetched_once_and_reused_across_requests(mirror, http, upstream):
    alpine = upstream.images["library/alpine"]
    await get(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    for digest in alpine.blobs:
        status, body = await get(http, f"{mirror.url}/v2/alpine/blobs/{digest}")
        assert (status, body) == (200, alpine.blobs[digest])
    scopes = [r for r in upstream.tokens.requests]
    assert len(scopes) == 1, scopes
    # Only the very first request met a 401; the rest carried the cached token.
    assert sum(r.status == 401 for r in upstream.proxy.records) == 1


async def test_new_scope_gets_its_token_up_front(mirror, http, upstream):
    await get(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    await get(http, f"{mirror.url}/v2/team/app/manifests/2.0")
    assert len(upstream.tokens.requests) == 2
    assert sum(r.status == 401 for r in upstream.proxy.records) == 1


async def test_expired_token_is_replaced(start_mirror, http, upstream):
    upstream.tokens.expires_in = 6  # cached for 1 s (less the 5 s safety margin)
    mirror = await start_mirror(tag_ttl=0)
    import asyncio
    await get(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    await asyncio.sleep(1.2)
    status, _ = await get(http, f"{mirror.url}/v2/alpine/manifests/3.19")
    assert status == 200
    assert len(upstream.tokens.requests) == 2


async def test_private_repository_needs_the_configured_credentials(start_mirror, http, upstream,
                                                                  tmp_path, caplog):
    secret = upstream.images["private/secret"]
    anonymous = await start_mirror(root=tmp_path / "anon")
    status, body = await get(http, f"{anonymous.url}/v2/private/secret/manifests/1")
    assert status == 403
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
    assert b"username and password" in body

    from mirror import config as cfg
    authed = await start_mirror(root=tmp_path / "authed", upstreams=(
        cfg.Upstream("docker.io", upstream.url, default=True, username="reader",
                     password="readpass", realm_hosts=(token_host(upstream),)),))
    status, body = await get(http, f"{authed.url}/v2/private/secret/manifests/1")
    assert (status, body) == (200, secret.manifest)
    assert [r["username"] for r in upstream.tokens.requests][-1] == "reader"
    # The secret never reaches a client: not in headers, not in bodies.
    for path in ("/v2/", "/v2/_catalog", "/v2/private/secret/tags/list"):
        async with http.get(authed.url + path) as resp:
            assert b"readpass" not in await resp.read()
            assert "readpass" not in str(resp.headers)
    assert "readpass" not in caplog.text


async def test_wrong_credentials_are_denied_with_a_message(start_mirror, http, upstream):
    from mirror import config as cfg
    mirror = await start_mirror(upstreams=(
        cfg.Upstream("docker.io", upstream.url, default=True, username="reader",
                     password="wrong", realm_hosts=(token_host(upstream),)),))
    status, body = await get(http, f"{mirror.url}/v2/team/app/manifests/2.0")
    assert status == 403
    assert b"check its username and password" in body
    assert fetched(upstream, "GET", "/manifests/") == 0
