"""Logins: every htpasswd format the `htpasswd` tool writes either logs in or stops the
start naming the line; long passwords; unknown users cost a check; the checks run on two
threads of their own; failed logins from one address are answered 429 without a check."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import threading
from unittest import mock

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from mirror import config as cfg
from mirror.api import logins as access_module
from mirror.api.access import Access
from mirror.api.htpasswd import HtpasswdError, md5_crypt, read_htpasswd
from mirror.api.logins import FAILURE_ADDRESSES, Failures
from mirror.app import make_app
from mirror.errors import TooManyRequests, Unauthorized
from tests.conftest import mirror_config
from tests.test_access import code, request


def basic(user: str, password: str | bytes) -> str:
    secret = password if isinstance(password, bytes) else password.encode()
    return "Basic " + base64.b64encode(user.encode() + b":" + secret).decode()


def openssl(*args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True,
                          check=True).stdout.decode().strip()


def cheap_bcrypt(password: bytes, prefix: str = "2b") -> str:
    """bcrypt at cost 4, so a test can afford many checks; `prefix` 2y is what htpasswd -B writes."""
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(4)).decode()
    return f"${prefix}${hashed[4:]}"


def write_htpasswd(path, **users: str) -> str:
    path.write_text("# made by the test\n\n" + "".join(f"{n}:{h}\n" for n, h in users.items()))
    return str(path)


@pytest.fixture
def spy(monkeypatch):
    """Every bcrypt check the mirror makes: (thread name, hash it was checked against)."""
    calls: list[tuple[str, bytes]] = []
    real = bcrypt.checkpw

    def checkpw(password: bytes, hashed: bytes) -> bool:
        calls.append((threading.current_thread().name, hashed))
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    return calls


def mocked(method: str, path: str, auth: str | None = None, remote: str | None = "192.0.2.7"):
    """A request as if from `remote` (TEST-NET-1: nothing is ever sent there)."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (remote, 40000) if name == "peername" and remote else default)
    headers = {"Authorization": auth} if auth else {}
    return make_mocked_request(method, path, headers=headers, transport=transport)


@pytest.mark.parametrize("password, salt", [
    ("password", "abcdefgh"), ("", ""), ("a", "x"), ("x" * 16, "12345678"), ("y" * 17, "ab"),
    ("p" * 100, "zzzzzzzz"), ("héllo wörld", "s.lt/9"), ("secret", "longer-than-8")])
def test_apr1_and_md5_crypt_match_openssl(password, salt):
    for flag, magic in (("-apr1", b"$apr1$"), ("-1", b"$1$")):
        expected = openssl("passwd", flag, "-salt", salt, password)
        assert md5_crypt(password.encode(), salt.encode(), magic).decode() == expected


@pytest.fixture
def every_format() -> dict[str, tuple[str, str]]:
    """user: (htpasswd entry, password), one for each format the htpasswd tool writes."""
    sha1 = subprocess.run(["openssl", "sha1", "-binary"], input=b"s h a", capture_output=True,
                          check=True).stdout
    return {
        "bcrypt2y": (cheap_bcrypt(b"b-2y", "2y"), "b-2y"),  # htpasswd -B
        "bcrypt2a": (cheap_bcrypt(b"b-2a", "2a"), "b-2a"),
        "bcrypt2b": (cheap_bcrypt(b"b-2b"), "b-2b"),        # mirror user add
        "apr1": (openssl("passwd", "-apr1", "-salt", "Zq9.e/Xa", "md5 pass"), "md5 pass"),
        "md5": (openssl("passwd", "-1", "-salt", "s4lt", "glibc"), "glibc"),
        "sha1": ("{SHA}" + openssl("base64", stdin=sha1), "s h a"),  # htpasswd -s
    }


async def test_every_format_the_htpasswd_tool_writes_logs_in(start_mirror, http, upstream,
                                                              tmp_path, every_format):
    users = every_format
    path = write_htpasswd(tmp_path / "htpasswd", **{u: h for u, (h, _) in users.items()})
    mirror = await start_mirror(access=cfg.Access(htpasswd=path, anonymous_pull=False))
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    for user, (_, password) in users.items():
        status, _, body = await request(http, "GET", url, basic(user, password))
        assert (status, body) == (200, upstream.images["team/app"].manifest), user
        status, headers, body = await request(http, "GET", url, basic(user, password + "!"))
        assert status == 401 and code(body) == "UNAUTHORIZED", user
        assert headers["WWW-Authenticate"] == (
            f'Bearer realm="{mirror.url}/auth/token",service="mirror",'
            'scope="repository:team/app:pull"')


@pytest.mark.parametrize("entry, reason", [
    ("abccBcrPOxnLU", "crypt (DES)"),                          # htpasswd -d
    ("hunter2-in-plain-text", "plain-text"),                    # htpasswd -p
    ("$2x$04$" + "a" * 53, "unsupported bcrypt"),   # crypt_blowfish's buggy variant
    ("$2y$04$" + "a" * 53, "damaged or unsupported bcrypt"),  # bcrypt: "Invalid salt"
    ("$2y$31$" + "a" * 21 + "O" + "a" * 30 + ".", "bcrypt cost 31"),
    ("$6$rounds=5000$salt$" + "a" * 86, "unknown hash"),        # glibc SHA-512 crypt
    ("{SHA}dG9vIHNob3J0", "damaged or unsupported SHA1"),
    ("$apr1$abcdefgh$tooshort", "damaged or unsupported apr1"),
])
def test_htpasswd_entries_that_cannot_be_checked_stop_the_start_naming_file_and_line(
        tmp_path, entry, reason):
    path = write_htpasswd(tmp_path / "htpasswd", alice=cheap_bcrypt(b"w"), bob=entry)
    config = mirror_config(tmp_path / "data", "http://127.0.0.1:9",
                           access=cfg.Access(htpasswd=path))
    with pytest.raises(HtpasswdError) as refused:
        make_app(config)
    message = str(refused.value)
    assert f"{path} line 4: user bob" in message and reason in message
    assert entry not in message  # it may be a password in plain text
    assert "mirror user add bob" in message or "cost" in message
    assert isinstance(refused.value, cfg.ConfigError)


@pytest.mark.parametrize("text, problem", [
    ("alice:{}\nno-colon-here\n", "line 2: not NAME:HASH"),
    ("alice:{}\n:{}\n", "line 2: not NAME:HASH"),
    ("alice:{}\n# comment\nalice:{}\n", "line 3: user alice appears twice"),
])
def test_malformed_htpasswd_lines_are_refused_with_the_line_number(tmp_path, text, problem):
    path = tmp_path / "htpasswd"
    path.write_text(text.format(*[cheap_bcrypt(b"w")] * text.count("{}")))
    with pytest.raises(HtpasswdError, match=problem):
        read_htpasswd(path)
    path.write_bytes(b"alice:\xff\xfe\n")
    with pytest.raises(HtpasswdError, match="line 1: not UTF-8"):
        read_htpasswd(path)


async def test_long_passwords_are_checked_by_their_first_72_bytes_and_never_fail(
        start_mirror, http, upstream, tmp_path):
    """bcrypt defines a password by its first 72 bytes (Apache's htpasswd and Distribution
    check it so); bcrypt>=4.1 raises ValueError past 72, which was a 500 for anyone."""
    first = bytes(range(33, 105))  # 72 bytes
    path = write_htpasswd(tmp_path / "htpasswd", long=cheap_bcrypt(first))
    mirror = await start_mirror(access=cfg.Access(htpasswd=path, anonymous_pull=False))
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    manifest = upstream.images["team/app"].manifest
    assert (await request(http, "GET", url, basic("long", first)))[::2] == (200, manifest)
    assert (await request(http, "GET", url, basic("long", first + b"tail")))[::2] == (200, manifest)
    for wrong in (b"x" + first[1:] + b"tail", b"z" * 4000):
        status, _, body = await request(http, "GET", url, basic("long", wrong))
        assert status == 401 and code(body) == "UNAUTHORIZED"


def test_user_add_refuses_a_password_over_72_bytes(tmp_path):
    path = tmp_path / "htpasswd"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}

    def user_add(password: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mirror", "user", "add", "carol",
                               "--htpasswd", str(path), "--password-stdin"], cwd=tmp_path,
                              env=env, input=password + "\n", capture_output=True, text=True,
                              check=False)

    refused = user_add("€" * 25)  # 25 characters, 75 bytes
    assert refused.returncode != 0 and "75 bytes" in refused.stderr
    assert "at most 72" in refused.stderr and not path.exists()
    added = user_add("€" * 24)  # 72 bytes
    assert added.returncode == 0, added.stderr
    entry = read_htpasswd(path)["carol"]
    assert entry.scheme == "bcrypt" and bcrypt.checkpw(("€" * 24).encode(), entry.hashed.encode())


async def test_unknown_users_cost_a_check_against_a_dummy_hash(start_mirror, http, tmp_path, spy):
    alice = cheap_bcrypt(b"wonder", "2y")
    path = write_htpasswd(tmp_path / "htpasswd", alice=alice)
    mirror = await start_mirror(access=cfg.Access(htpasswd=path))
    status, _, body = await request(http, "GET", f"{mirror.url}/v2/", basic("mallory", "x"))
    assert status == 401 and code(body) == "UNAUTHORIZED"
    assert len(spy) == 1
    dummy = spy[0][1]
    assert dummy != alice.encode() and dummy[4:7] == b"04$"  # as slow as alice's entry
    status, _, body = await request(http, "GET", f"{mirror.url}/v2/", basic("alice", "x"))
    assert status == 401 and code(body) == "UNAUTHORIZED"  # the same answer as mallory's
    assert [hashed for _, hashed in spy] == [dummy, alice.encode()]


async def test_password_checks_run_on_two_threads_of_their_own(start_mirror, http, tmp_path, spy):
    users = {f"user{i}": cheap_bcrypt(f"pw{i}".encode()) for i in range(6)}
    path = write_htpasswd(tmp_path / "htpasswd", **users)
    mirror = await start_mirror(access=cfg.Access(htpasswd=path, anonymous_pull=False))
    answers = await asyncio.gather(*(
        request(http, "GET", f"{mirror.url}/v2/", basic(user, f"pw{i}"))
        for i, user in enumerate(users)))
    assert [status for status, _, _ in answers] == [200] * 6
    threads = {name for name, _ in spy}
    assert len(spy) == 6 and 1 <= len(threads) <= 2
    assert all(name.startswith("mirror-login") for name in threads), threads


async def test_the_check_threads_stop_with_the_app(tmp_path):
    path = write_htpasswd(tmp_path / "htpasswd", alice=cheap_bcrypt(b"wonder"))
    access = Access(cfg.Access(htpasswd=path))
    app = web.Application()
    access.install(app)
    app.freeze()
    await app.startup()
    assert await access.user(mocked("GET", "/v2/", basic("alice", "wonder"))) == "alice"
    await app.cleanup()
    with pytest.raises(RuntimeError, match="shutdown"):
        access.executor.submit(print)


async def test_failed_logins_from_one_address_get_429_without_a_check(start_mirror, http,
                                                                      upstream, tmp_path, spy):
    path = write_htpasswd(tmp_path / "htpasswd", alice=cheap_bcrypt(b"wonder"))
    mirror = await start_mirror(access=cfg.Access(htpasswd=path, login_failures_per_minute=2))
    url = f"{mirror.url}/v2/team/app/manifests/2.0"
    for guess in ("one", "two"):
        assert (await request(http, "GET", url, basic("alice", guess)))[0] == 401
    assert len(spy) == 2
    for auth in (basic("alice", "three"), basic("alice", "wonder"), basic("nobody", "x")):
        status, headers, body = await request(http, "GET", url, auth)
        assert status == 429 and code(body) == "TOOMANYREQUESTS"
        assert headers["Content-Type"] == "application/json"
        assert 1 <= int(headers["Retry-After"]) <= 60
    assert len(spy) == 2  # no bcrypt ran for any of them
    for anonymous in (None, "Basic Og=="):  # pulls without a login go on
        status, _, body = await request(http, "GET", url, anonymous)
        assert (status, body) == (200, upstream.images["team/app"].manifest)


async def test_concurrent_guesses_cannot_outrun_the_limit(tmp_path, monkeypatch):
    path = write_htpasswd(tmp_path / "htpasswd", alice=cheap_bcrypt(b"wonder"))
    access = Access(cfg.Access(htpasswd=path, login_failures_per_minute=3))
    release, calls = threading.Event(), []

    def slow_checkpw(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        release.wait(30)
        return False

    monkeypatch.setattr(bcrypt, "checkpw", slow_checkpw)
    guesses = [asyncio.ensure_future(access.user(mocked("GET", "/v2/", basic("alice", f"g{i}"))))
               for i in range(10)]
    await asyncio.sleep(0)  # every guess reaches its check (or its refusal) before any ends
    release.set()
    results = await asyncio.gather(*guesses, return_exceptions=True)
    assert [type(r) for r in results] == [Unauthorized] * 3 + [TooManyRequests] * 7
    assert len(calls) == 3
    access.executor.shutdown()


async def test_the_same_credentials_at_once_share_one_check_and_are_remembered(tmp_path, spy):
    path = write_htpasswd(tmp_path / "htpasswd", alice=cheap_bcrypt(b"wonder"))
    access = Access(cfg.Access(htpasswd=path))
    logins = [access.user(mocked("GET", "/v2/", basic("alice", "wonder"), remote=f"192.0.2.{i}"))
              for i in range(5)]  # a fleet of nodes starting at once
    assert await asyncio.gather(*logins) == ["alice"] * 5
    assert await access.user(mocked("GET", "/v2/", basic("alice", "wonder"))) == "alice"
    assert len(spy) == 1
    access.executor.shutdown()


def test_failures_are_counted_in_a_sliding_minute_for_a_bounded_number_of_addresses():
    now = [1000.0]
    failures = Failures(2, clock=lambda: now[0])
    for _ in range(2):
        failures.begin("192.0.2.7")
        failures.end("192.0.2.7", failed=True)
    failures.begin("192.0.2.8")  # another address is not held up
    failures.end("192.0.2.8", failed=False)
    now[0] += 30
    with pytest.raises(TooManyRequests) as held:
        failures.begin("192.0.2.7")
    assert held.value.headers == {"Retry-After": "30"}
    now[0] += 30.5
    failures.begin("192.0.2.7")  # the first failures are a minute old
    failures.end("192.0.2.7", failed=False)

    for i in range(FAILURE_ADDRESSES + 5):
        failures.begin(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        failures.end(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", failed=True)
    assert len(failures) == FAILURE_ADDRESSES
    assert access_module.FAILURE_WINDOW == 60.0
