"""The mirror's token service (api/tokens.py): the Bearer flow every client follows.

What a client does, in order, as Docker, containerd and containers/image do it: the ping is
challenged with `Bearer realm=<this mirror>/auth/token`; the client asks that realm for a
token (anonymously, or with its login as Basic, or containerd's OAuth2 POST); then it sends
`Authorization: Bearer` on each request, and asks again when a 401 names a wider scope.
Real engines follow this flow in test_engine_docker.py and test_engine_podman.py.
"""

from __future__ import annotations

import base64
import json
import os
import stat

import aiohttp
import pytest

from mirror import config as cfg
from mirror.api.htpasswd import add_user
from mirror.api.tokens import KEY_FILE, TOKEN_SECONDS, TokenKey, Tokens, parse_scopes
from mirror.errors import Unauthorized

ALICE = "Basic " + base64.b64encode(b"alice:wonder").decode()  # may push
BOB = "Basic " + base64.b64encode(b"bob:builder").decode()     # may only pull
WRONG = "Basic " + base64.b64encode(b"alice:nope").decode()


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "htpasswd"
    add_user(path, "alice", "wonder")
    add_user(path, "bob", "builder")
    return str(path)


async def get(http, url, auth=None, method="GET", data=None):
    headers = {"Authorization": auth} if auth else {}
    async with http.request(method, url, headers=headers, data=data) as resp:
        return resp.status, resp.headers, await resp.read()


def claims(token: str) -> dict:
    payload = token.partition(".")[0]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def token(http, mirror, scope, auth=None):
    status, headers, body = await get(
        http, f"{mirror.url}/auth/token?service=mirror&scope={scope}", auth)
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    answer = json.loads(body)
    assert answer["token"] == answer["access_token"] and answer["expires_in"] == TOKEN_SECONDS
    return answer["token"]


async def test_an_anonymous_token_pulls_and_is_told_to_log_in_for_a_push(start_mirror, http,
                                                                        upstream, htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd))
    app = upstream.images["team/app"]
    anonymous = await token(http, mirror, "repository:team/app:pull,push")
    assert claims(anonymous)["sub"] == ""
    assert claims(anonymous)["access"] == [
        {"type": "repository", "name": "team/app", "actions": ["pull"]}]  # no push granted
    bearer = f"Bearer {anonymous}"
    assert (await get(http, f"{mirror.url}/v2/", bearer))[:1] == (200,)  # the ping is answered
    status, _, body = await get(http, f"{mirror.url}/v2/team/app/manifests/2.0", bearer)
    assert (status, body) == (200, app.manifest)
    for digest, data in app.blobs.items():
        assert (await get(http, f"{mirror.url}/v2/team/app/blobs/{digest}", bearer))[::2] == (
            200, data)
    status, headers, body = await get(http, f"{mirror.url}/v2/mine/blobs/uploads/", bearer,
                                      method="POST")
    assert status == 401 and b"log in to push" in body
    # The challenge names the scope a push needs, so the client asks for exactly that.
    assert headers["WWW-Authenticate"] == (
        f'Bearer realm="{mirror.url}/auth/token",service="mirror",'
        'scope="repository:mine:pull,push"')
    assert not (mirror.root / "uploads").exists() or not any((mirror.root / "uploads").iterdir())


async def test_a_login_gets_what_the_policy_grants_and_the_token_stands_for_it(
        start_mirror, http, htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd, push_users=("alice",)))
    scope = "repository:team/new:pull,push"
    alice = await token(http, mirror, scope, ALICE)
    bob = await token(http, mirror, scope, BOB)
    assert (claims(alice)["sub"], claims(alice)["access"][0]["actions"]) == (
        "alice", ["pull", "push"])
    assert (claims(bob)["sub"], claims(bob)["access"][0]["actions"]) == ("bob", ["pull"])
    url = f"{mirror.url}/v2/team/new/blobs/uploads/"
    status, headers, _ = await get(http, url, f"Bearer {alice}", method="POST")
    assert status == 202 and headers["Location"]
    status, _, body = await get(http, url, f"Bearer {bob}", method="POST")
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
    # Basic credentials on the request itself still work (curl -u, scripts).
    assert (await get(http, url, ALICE, method="POST"))[0] == 202


async def test_wrong_logins_and_forged_tokens_are_refused(start_mirror, http, htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd))
    status, headers, body = await get(http, f"{mirror.url}/auth/token?service=mirror", WRONG)
    assert status == 401 and b"wrong user name or password" in body
    assert headers["WWW-Authenticate"] == 'Basic realm="mirror"'  # the realm wants a login
    good = await token(http, mirror, "repository:team/app:pull", ALICE)
    payload, _, mac = good.partition(".")
    forged_claims = {**claims(good), "sub": "root"}
    forged = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).rstrip(b"=").decode()
    for bad in (f"{forged}.{mac}", f"{payload}.{mac[:-2]}AA", "not-a-token", ""):
        status, headers, body = await get(http, f"{mirror.url}/v2/team/app/manifests/2.0",
                                          f"Bearer {bad}")
        assert status == 401 and b"not one this registry issued" in body, bad
        assert headers["WWW-Authenticate"].startswith(
            f'Bearer realm="{mirror.url}/auth/token"')
    # A token is not a login: the realm takes no token in place of a password.
    status, headers, body = await get(http, f"{mirror.url}/auth/token?service=mirror",
                                      f"Bearer {good}")
    assert (status, headers["WWW-Authenticate"]) == (401, 'Basic realm="mirror"')
    assert b"only Basic credentials" in body  # so a token cannot be renewed forever


async def test_without_anonymous_pull_the_realm_asks_for_a_login(start_mirror, http, upstream,
                                                                htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd, anonymous_pull=False))
    status, headers, body = await get(
        http, f"{mirror.url}/auth/token?service=mirror&scope=repository:team/app:pull")
    assert status == 401 and b"log in to pull" in body
    assert headers["WWW-Authenticate"] == 'Basic realm="mirror"'
    bob = await token(http, mirror, "repository:team/app:pull", BOB)
    status, _, body = await get(http, f"{mirror.url}/v2/team/app/manifests/2.0", f"Bearer {bob}")
    assert (status, body) == (200, upstream.images["team/app"].manifest)
    assert upstream.proxy.requests  # fetched through the mirror, for bob


async def test_containerd_posts_the_oauth2_password_grant(start_mirror, http, htpasswd):
    """containerd with a login POSTs `grant_type=password` first; any other grant gets 400,
    on which containerd falls back to GET with Basic credentials."""
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd))
    form = {"grant_type": "password", "username": "alice", "password": "wonder",
            "service": "mirror", "scope": "repository:team/app:pull,push",
            "client_id": "containerd-client"}
    status, _, body = await get(http, f"{mirror.url}/auth/token", method="POST", data=form)
    assert status == 200
    assert claims(json.loads(body)["access_token"])["sub"] == "alice"
    status, _, body = await get(http, f"{mirror.url}/auth/token", method="POST",
                                data={**form, "password": "nope"})
    assert status == 401 and b"wrong user name or password" in body
    status, _, body = await get(http, f"{mirror.url}/auth/token", method="POST",
                                data={"grant_type": "refresh_token", "refresh_token": "x"})
    assert status == 400 and b"grant_type=password" in body


async def test_a_mirror_without_logins_has_no_token_service(start_mirror, http):
    mirror = await start_mirror()
    status, headers, body = await get(http, f"{mirror.url}/auth/token?service=mirror")
    assert status == 404 and b"no logins" in body and "WWW-Authenticate" not in headers
    assert not (mirror.root / KEY_FILE).exists()


async def test_tokens_outlive_a_restart_and_the_key_file_is_private(start_mirror, http,
                                                                   htpasswd, tmp_path):
    root = tmp_path / "data"
    first = await start_mirror(root=root, access=cfg.Access(htpasswd=htpasswd))
    issued = await token(http, first, "repository:team/app:pull", BOB)
    key = root / KEY_FILE
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and len(key.read_bytes()) == 32
    await first.server.close()
    again = await start_mirror(root=root, access=cfg.Access(htpasswd=htpasswd))
    assert (await get(http, f"{again.url}/v2/", f"Bearer {issued}"))[0] == 200
    other = await start_mirror(root=tmp_path / "other", access=cfg.Access(htpasswd=htpasswd))
    assert (await get(http, f"{other.url}/v2/", f"Bearer {issued}"))[0] == 401


def test_replicas_share_the_key_through_the_cluster_secret_and_tokens_expire(tmp_path):
    now = [1_000_000.0]
    one = Tokens(TokenKey(str(tmp_path / "a"), secret="s" * 32, cluster="prod"),
                 clock=lambda: now[0])
    two = Tokens(TokenKey(str(tmp_path / "b"), secret="s" * 32, cluster="prod"),
                 clock=lambda: now[0])
    stranger = Tokens(TokenKey(str(tmp_path / "c"), secret="t" * 32, cluster="prod"),
                      clock=lambda: now[0])
    staging = Tokens(TokenKey(str(tmp_path / "d"), secret="s" * 32, cluster="staging"),
                     clock=lambda: now[0])  # the same secret copied to another cluster
    issued = one.issue("alice", [], login="L")["token"]
    assert two.user(issued) == ("alice", "L")
    for other in (stranger, staging):
        with pytest.raises(Unauthorized, match="not one this registry issued"):
            other.user(issued)
    # Only the exact text is a token: base64 that decodes to the same MAC is not.
    for respelled in (issued + "=", issued + "!!==", issued.replace(".", ". ")):
        with pytest.raises(Unauthorized, match="not one this registry issued"):
            two.user(respelled)
    assert not (tmp_path / "a").exists()  # with a secret no key file is written
    now[0] += TOKEN_SECONDS
    with pytest.raises(Unauthorized, match="expired"):
        two.user(issued)


def test_scopes_parse_as_the_spec_writes_them():
    assert parse_scopes(["repository:team/app:pull,push", "registry:catalog:*",
                         "repository:127.0.0.1:5000/x:pull repository:y:"]) == [
        ("repository", "team/app", ["pull", "push"]),
        ("repository", "127.0.0.1:5000/x", ["pull"]),
        ("repository", "y", [])]


async def test_a_token_ends_when_its_user_is_removed_or_gets_a_new_password(
        start_mirror, http, tmp_path):
    path = tmp_path / "htpasswd"
    add_user(path, "alice", "wonder")
    add_user(path, "bob", "builder")
    root = tmp_path / "data"
    first = await start_mirror(root=root, access=cfg.Access(htpasswd=str(path)))
    alice = await token(http, first, "repository:x:pull", ALICE)
    bob = await token(http, first, "repository:x:pull", BOB)
    await first.server.close()
    path.write_text("")  # both gone; alice comes back with another password
    add_user(path, "alice", "looking-glass")
    again = await start_mirror(root=root, access=cfg.Access(htpasswd=str(path)))
    for stale in (alice, bob):
        status, headers, body = await get(http, f"{again.url}/v2/", f"Bearer {stale}")
        assert status == 401 and b"log in again" in body
        assert headers["WWW-Authenticate"].startswith("Bearer realm=")
    fresh = await token(http, again, "repository:x:pull",
                        "Basic " + base64.b64encode(b"alice:looking-glass").decode())
    assert (await get(http, f"{again.url}/v2/", f"Bearer {fresh}"))[0] == 200


async def test_the_realm_is_the_mirror_as_the_client_reached_it_and_never_a_forged_host(
        start_mirror, http, htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd))
    ping = f"{mirror.url}/v2/"

    async def realm(**headers):
        async with http.get(ping, headers=headers) as resp:
            assert resp.status == 401
            return resp.headers["WWW-Authenticate"]

    assert await realm() == f'Bearer realm="{mirror.url}/auth/token",service="mirror"'
    # Behind a reverse proxy that terminates TLS (nginx: proxy_set_header X-Forwarded-*).
    assert await realm(**{"X-Forwarded-Proto": "https",
                          "X-Forwarded-Host": "mirror.example"}) == (
        'Bearer realm="https://mirror.example/auth/token",service="mirror"')
    # A Host that is not host[:port] is never written into the header.
    assert await realm(Host='evil.example",service="x') == (
        f'Bearer realm="http://{mirror.host}/auth/token",service="mirror"')
    # Nor is a name that is not one.
    async with http.get(f"{mirror.url}/v2/a%22,realm=%22x/manifests/1",
                        headers={"Authorization": WRONG}) as resp:
        assert resp.status in (400, 401) and "realm=\"x" not in resp.headers.get(
            "WWW-Authenticate", "")


async def test_the_token_form_is_small_and_urlencoded_only(start_mirror, http, htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd))
    data = aiohttp.FormData()
    data.add_field("grant_type", "password")
    data.add_field("file", b"x" * 100_000, filename="big.bin")  # multipart: refused
    status, _, body = await get(http, f"{mirror.url}/auth/token", method="POST", data=data)
    assert status == 400 and b"x-www-form-urlencoded" in body
    status, _, body = await get(http, f"{mirror.url}/auth/token", method="POST",
                                data={"grant_type": "password", "username": "a" * 9000})
    assert status == 400 and b"at most 8192 bytes" in body


def test_several_replicas_with_logins_need_the_cluster_secret(tmp_path):
    with pytest.raises(cfg.ConfigError, match="need cluster.secret"):
        cfg.load(None, environ={"MIRROR_CLUSTER_REDIS": "redis://127.0.0.1:1/0",
                                "MIRROR_ACCESS_HTPASSWD": str(tmp_path / "htpasswd"),
                                "MIRROR_STORAGE_BACKEND": "s3",
                                "MIRROR_STORAGE_S3_BUCKET": "b",
                                "MIRROR_STORAGE_S3_ENDPOINT": "http://127.0.0.1:1"})
