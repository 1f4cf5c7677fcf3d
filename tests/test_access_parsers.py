"""Property tests for the parsers of the access layer: htpasswd lines and files, the
Authorization header, client addresses. Each gives a typed error or a correct parse,
never another exception; and an entry that loaded can always be checked without one."""

from __future__ import annotations

import base64
import ipaddress
import logging

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mirror.api.htpasswd import (
    BCRYPT,
    MD5_CRYPT,
    SHA1,
    Entry,
    HtpasswdError,
    htpasswd_entry,
    read_htpasswd,
    verify,
)
from mirror.api.logins import basic_credentials, client_key, is_loopback
from mirror.errors import Unauthorized

# Hash shapes that load, with bcrypt at cost 4 so each check is cheap.
LOADABLE = {
    "bcrypt": r"\$2[aby]\$04\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{30}[.CGKOSWaeimquy26]",
    "apr1": r"\$apr1\$[!-#%-~]{0,8}\$[./0-9A-Za-z]{22}",
    "md5": r"\$1\$[!-#%-~]{0,8}\$[./0-9A-Za-z]{22}",
    "sha1": r"\{SHA\}[A-Za-z0-9+/]{27}=",
}
names = st.text(st.characters(blacklist_characters=":\n\r", blacklist_categories=("Cs",)),
                min_size=1, max_size=12).filter(lambda n: n.strip() == n and n[0] != "#")
hashes = st.one_of([st.from_regex(f"\\A{pattern}\\Z") for pattern in LOADABLE.values()])
# Lines near the accepted shapes: a loadable hash with a character changed, cut or added.
mutated = st.tuples(hashes, st.integers(0, 80), st.text(max_size=2)).map(
    lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + 1:])
lines = st.one_of(
    st.text(max_size=120),
    st.tuples(names, st.one_of(hashes, mutated, st.text(max_size=60))).map(":".join),
    st.tuples(st.sampled_from(["", " ", "#", "\t"]), st.text(max_size=40)).map("".join))


@given(lines)
@example("alice:abccBcrPOxnLU")
@example("bob:$2y$31$" + "a" * 21 + "O" + "a" * 30 + ".")
@example(":$apr1$$" + "." * 22)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_an_htpasswd_line_loads_correctly_or_raises_htpasswd_error(line):
    try:
        entry = htpasswd_entry(line, "line 1")
    except HtpasswdError as e:
        assert str(e).startswith("line 1: ")
        name, _, hashed = line.strip().partition(":")
        if len(hashed) >= 6 and hashed not in name:
            assert hashed not in str(e)  # never echoed: it may be a password
        return
    if entry is None:
        assert not line.strip() or line.strip().startswith("#")
        return
    assert f"{entry.name}:{entry.hashed}" == line.strip() and entry.name
    pattern = {"bcrypt": BCRYPT, "apr1": MD5_CRYPT, "md5": MD5_CRYPT, "sha1": SHA1}[entry.scheme]
    assert pattern.fullmatch(entry.hashed)


@given(names, hashes, st.binary(max_size=100))
@settings(deadline=None)
def test_every_entry_that_loads_can_be_checked_without_an_error(name, hashed, password):
    entry = htpasswd_entry(f"{name}:{hashed}", "line 1")
    assert isinstance(entry, Entry)
    logger = logging.getLogger("mirror")
    errors = []
    handler = logging.Handler()
    handler.emit = errors.append
    logger.addHandler(handler)
    try:
        assert verify(entry, password) in (True, False)
    finally:
        logger.removeHandler(handler)
    assert errors == []  # not even the "bcrypt cannot read" fallback


@given(st.binary(max_size=300))
@example(b"alice:$2b$04$" + b"." * 53 + b"\nalice:x\n")
@example(b"\xff:\n")
def test_an_htpasswd_file_loads_or_raises_htpasswd_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("htpasswd") / "htpasswd"
    path.write_bytes(data)
    try:
        users = read_htpasswd(path)
    except HtpasswdError as e:
        assert str(path) in str(e) and " line " in str(e)
        return
    assert all(entry.name == name for name, entry in users.items())


headers = st.one_of(
    st.text(max_size=80),
    st.tuples(st.sampled_from(["Basic ", "basic ", "BASIC  ", "Bearer ", "Basic", ""]),
              st.one_of(st.text(max_size=40),
                        st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()))
              ).map("".join))


@given(headers)
@example("Basic Og==")
@example("Basic ==")
@example("Basic é")
@example("Basic " + base64.b64encode(b"\xff:pw").decode())
def test_an_authorization_header_parses_or_raises_unauthorized(header):
    try:
        credentials = basic_credentials(header)
    except Unauthorized as e:
        # The challenge is added by the middleware (a Bearer realm on this mirror).
        assert e.status == 401 and e.message and "WWW-Authenticate" not in e.headers
        return
    if credentials is None:
        return  # anonymous: no header, or empty user and password
    name, password = credentials
    assert isinstance(name, str) and isinstance(password, bytes) and (name or password)
    decoded = base64.b64decode(header.strip().partition(" ")[2].strip())
    assert decoded == name.encode() + b":" + password


@given(st.text(st.characters(blacklist_characters=":", blacklist_categories=("Cs",)),
               max_size=20), st.binary(max_size=80), st.sampled_from(["Basic", "basic", "BaSiC"]))
def test_basic_credentials_round_trip(name, password, scheme):
    header = f"{scheme} " + base64.b64encode(name.encode() + b":" + password).decode()
    expected = None if not name and not password else (name, password)
    assert basic_credentials(header) == expected


@given(st.one_of(st.ip_addresses(), st.text(max_size=50), st.none()))
@example("::ffff:127.0.0.1")
@example("fe80::1%eth0")
def test_client_addresses_never_raise(remote):
    if isinstance(remote, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        address = remote.ipv4_mapped if getattr(remote, "ipv4_mapped", None) else remote
        assert is_loopback(str(remote)) == address.is_loopback
        remote = str(remote)
    assert isinstance(is_loopback(remote), bool) and isinstance(client_key(remote), str)


def test_an_ipv6_host_is_one_client_for_the_failure_count():
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key("2001:db8:0:1::1") != client_key("2001:db8::1")
    assert client_key("::ffff:192.0.2.7") == client_key("192.0.2.7") == "192.0.2.7"
