"""Who may do what: htpasswd logins behind a Bearer challenge, pull and push policy, read-only,
the empty credentials containers/image sends, and the seed workflow over HTTPS with a CA
made by `mirror tls init`. More in test_access_logins.py (htpasswd formats, rate limits,
the password-check threads), test_access_push.py (who may push without logins) and
test_access_parsers.py (property tests) and test_access_tokens.py (the token service)."""

import asyncio
import base64
import json

import aiohttp
import pytest
from aiohttp import web

from mirror import config as cfg
from mirror.api.htpasswd import add_user
from mirror.app import make_app
from mirror.ops.certs import make_ca_and_server_cert
from tests.conftest import mirror_config
from tests.test_clients_podman import assert_same, dead, pull, registries_conf

ALICE = "Basic " + base64.b64encode(b"alice:wonder").decode()  # may push
BOB = "Basic " + base64.b64encode(b"bob:builder").decode()     # may only pull
WRONG = "Basic " + base64.b64encode(b"alice:nope").decode()
EMPTY = "Basic Og=="  # base64(":"): podman, CRI-O, skopeo and buildah without credentials


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory):
    path = tmp_path_factory.mktemp("access") / "htpasswd"
    add_user(path, "alice", "wonder")
    add_user(path, "bob", "builder")
    return str(path)


async def request(http, method, url, auth=None, data=None):
    headers = {"Authorization": auth} if auth else {}
    async with http.request(method, url, headers=headers, data=data) as resp:
        return resp.status, resp.headers, await resp.read()


def code(body):
    return json.loads(body)["errors"][0]["code"]


def challenge(mirror) -> str:
    """The ping's challenge: a token from the mirror's own token service."""
    return f'Bearer realm="{mirror.url}/auth/token",service="mirror"'


async def test_ping_challenges_until_logged_in_and_wrong_passwords_get_401(start_mirror, http,
                                                                          htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd))
    status, headers, body = await request(http, "GET", f"{mirror.url}/v2/")
    assert status == 401 and headers["WWW-Authenticate"] == challenge(mirror)
    assert code(body) == "UNAUTHORIZED"
    assert (await request(http, "GET", f"{mirror.url}/v2/", BOB))[0] == 200
    for method, path in (("GET", "/v2/"), ("GET", "/v2/alpine/manifests/3.19"),
                         ("POST", "/v2/x/blobs/uploads/")):
        status, headers, body = await request(http, method, mirror.url + path, WRONG)
        assert status == 401 and "WWW-Authenticate" in headers and code(body) == "UNAUTHORIZED"


async def test_anonymous_pull_on_push_only_for_push_users(start_mirror, http, upstream, htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd, push_users=("alice",)))
    # Docker sends credentials only after its ping was challenged: the ping must still be.
    status, headers, _ = await request(http, "GET", f"{mirror.url}/v2/")
    assert status == 401 and headers["WWW-Authenticate"] == challenge(mirror)
    status, _, _ = await request(http, "GET", f"{mirror.url}/v2/", ALICE)
    assert status == 200
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    status, _, body = await request(http, "GET", url)
    assert (status, body) == (200, upstream.images["team/app"].manifest)
    status, headers, body = await request(http, "POST", f"{mirror.url}/v2/mine/blobs/uploads/")
    assert status == 401 and code(body) == "UNAUTHORIZED"
    status, _, body = await request(http, "POST", f"{mirror.url}/v2/mine/blobs/uploads/", BOB)
    assert status == 403 and code(body) == "DENIED"
    status, _, _ = await request(http, "POST", f"{mirror.url}/v2/mine/blobs/uploads/", ALICE)
    assert status == 202


async def test_anonymous_pull_off_needs_a_login(start_mirror, http, upstream, htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd, anonymous_pull=False))
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    status, _, body = await request(http, "GET", url)
    assert status == 401 and code(body) == "UNAUTHORIZED"
    assert upstream.proxy.requests == []
    status, _, body = await request(http, "GET", url, BOB)
    assert (status, body) == (200, upstream.images["team/app"].manifest)
    for probe in ("/healthz", "/readyz"):  # Kubernetes probes carry no credentials
        assert (await request(http, "GET", mirror.url + probe))[0] == 200
    assert (await request(http, "GET", f"{mirror.url}/metrics"))[0] == 401


async def test_read_only_refuses_pushes_and_deletes_but_pulls_through(start_mirror, http,
                                                                      upstream):
    mirror = await start_mirror(access=cfg.Access(read_only=True))
    for method, path in (("POST", "/v2/x/blobs/uploads/"), ("PUT", "/v2/x/manifests/t"),
                         ("DELETE", "/v2/x/blobs/sha256:" + "a" * 64)):
        status, _, body = await request(http, method, mirror.url + path)
        assert status == 405 and code(body) == "UNSUPPORTED" and b"read-only" in body
    status, _, body = await request(http, "GET", f"{mirror.url}/v2/team/app/manifests/2.0")
    assert status == 200


async def skopeo(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec("skopeo", *args, "--retry-times=0",
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


async def test_seed_workflow_over_https_with_basic_auth(start_mirror, upstream, htpasswd,
                                                        tmp_path):
    certs = tmp_path / "certs"
    ca, cert, key = make_ca_and_server_cert(certs, ["127.0.0.1"])
    mirror = await start_mirror(
        server=cfg.Server(listen="127.0.0.1:0", tls_certificate=str(cert), tls_key=str(key)),
        access=cfg.Access(htpasswd=htpasswd, anonymous_pull=False))
    trust = tmp_path / "trust"  # skopeo's --cert-dir: the CA and nothing else
    trust.mkdir()
    (trust / "ca.crt").write_bytes(ca.read_bytes())
    source = f"docker://{upstream.registry_url[7:]}/library/alpine:3.19"
    await skopeo("copy", "--src-tls-verify=false", f"--dest-cert-dir={trust}",
                 "--dest-creds=alice:wonder", source, f"docker://{mirror.host}/newhello:latest")
    await skopeo("copy", f"--src-cert-dir={trust}", "--src-creds=bob:builder",
                 f"docker://{mirror.host}/newhello:latest", f"dir:{tmp_path / 'pulled'}")
    manifest = (tmp_path / "pulled" / "manifest.json").read_bytes()
    assert manifest == upstream.images["library/alpine"].manifest
    context = __import__("ssl").create_default_context(cafile=str(ca))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{mirror.url}/v2/_catalog", ssl=context,
                            headers={"Authorization": BOB}) as resp:
            assert (await resp.json())["repositories"] == ["newhello"]


async def test_empty_basic_credentials_are_answered_as_no_header(start_mirror, http, upstream,
                                                                 htpasswd):
    mirror = await start_mirror(access=cfg.Access(htpasswd=htpasswd))
    app = upstream.images["team/app"]
    for auth in (None, EMPTY):
        status, headers, body = await request(http, "GET", f"{mirror.url}/v2/", auth)
        assert status == 401 and headers["WWW-Authenticate"] == challenge(mirror)
        assert b"log in to pull" in body  # the ping's challenge, not "wrong user name"
        status, _, body = await request(http, "GET", f"{mirror.url}/v2/team/app/manifests/2.0",
                                        auth)
        assert (status, body) == (200, app.manifest)
        for digest, data in app.blobs.items():
            status, _, body = await request(http, "GET", f"{mirror.url}/v2/team/app/blobs/{digest}",
                                            auth)
            assert (status, body) == (200, data)
        status, _, body = await request(http, "POST", f"{mirror.url}/v2/mine/blobs/uploads/", auth)
        assert status == 401 and b"log in to push" in body
    assert not (mirror.root / "uploads").exists() or not any((mirror.root / "uploads").iterdir())


@pytest.fixture
async def recorded_mirror(tmp_path, upstream, aiohttp_server):
    """Start a mirror and keep (path, status, Authorization) of every answer it sends."""

    async def start(**overrides):
        app = make_app(mirror_config(tmp_path / "data", upstream.url, **overrides))
        seen: list[tuple[str, int, str | None]] = []

        async def note(request: web.Request, response: web.StreamResponse) -> None:
            seen.append((request.path, response.status, request.headers.get("Authorization")))

        app.on_response_prepare.append(note)
        server = await aiohttp_server(app)
        return f"127.0.0.1:{server.port}", seen

    return start


async def test_skopeo_pulls_anonymously_from_a_mirror_with_logins(recorded_mirror, upstream,
                                                                  htpasswd, tmp_path):
    """containers/image answers the Bearer challenge of the ping by fetching a token without
    credentials; the token service gives it an anonymous one, and the pull goes on with it.
    (To a Basic challenge it answered `Basic Og==`, which must also stay anonymous: see
    test_empty_basic_credentials_are_answered_as_no_header.)"""
    alpine = upstream.images["library/alpine"]
    host, seen = await recorded_mirror(access=cfg.Access(htpasswd=htpasswd, anonymous_pull=True))
    conf = registries_conf(tmp_path / "registries.conf", ("docker.io", dead(), f"{host}/hub", ""))

    got = await pull(conf, "docker.io/library/alpine:3.19", tmp_path / "pulled")
    assert_same(got, alpine)  # manifest and every blob, byte for byte
    assert ("/v2/", 401, None) in seen  # the ping is challenged ...
    assert ("/auth/token", 200, None) in seen  # ... an anonymous token is fetched ...
    answered = {(path, status) for path, status, auth in seen
                if auth and auth.startswith("Bearer ")}
    assert ("/v2/hub/library/alpine/manifests/3.19", 200) in answered  # ... and pulls
    for digest in alpine.blobs:
        assert (f"/v2/hub/library/alpine/blobs/{digest}", 200) in answered
