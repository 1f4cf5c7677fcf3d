"""Property tests (hypothesis) over every parser that sees client or upstream input: a typed
error (RegistryError, ConfigError) or a correct parse — never another exception.

Each property mixes arbitrary text (what a hostile peer sends) with structured values built
from the grammar (so a correct parse is checked, not only the absence of a crash). Parsers
that live inside a handler (the upload's Content-Range, a pushed manifest's validation) are
fuzzed through the HTTP API of a mirror on its own thread: any 5xx is a failure.
bench/fuzz.py runs the same parsers under atheris, coverage-guided, for longer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import re
from datetime import datetime, timezone
from itertools import pairwise
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mirror import config as cfg
from mirror.api.responses import parse_ranges
from mirror.app import make_app
from mirror.cache.proxy import _next_link
from mirror.errors import RangeInvalid, RegistryError, Unavailable
from mirror.media import LIST_TYPES, references
from mirror.reference import (
    NAME,
    NAME_MAX,
    Router,
    parse_digest,
    parse_name,
    parse_reference,
    parse_tag,
)
from mirror.upstream.auth import parse_challenges
from mirror.upstream.client import _content_range, retry_delay
from tests.conftest import mirror_config
from tests.support.serverthread import ServerThread

FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

# What can arrive in an HTTP header: aiohttp decodes header bytes as latin-1 (or utf-8 with
# surrogateescape), so any code point below 256, and a little beyond for good measure.
header_text = st.text(st.characters(max_codepoint=0x3FF, blacklist_categories=("Cs",)),
                      max_size=200)
numbers = st.one_of(st.integers(0, 2 ** 64).map(str), st.just("9" * 5000),
                    st.text("0123456789", min_size=1, max_size=30))

# -- names, tags, digests, references ----------------------------------------------------

# Built from the grammar's pieces (from_regex is slow to draw from): [a-z0-9]+ joined by
# separators, components joined by "/".
alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
component = st.tuples(alnum, st.lists(st.tuples(st.sampled_from([".", "_", "__", "-", "---"]),
                                                alnum), max_size=3)).map(
    lambda t: t[0] + "".join(sep + part for sep, part in t[1]))
valid_name = st.lists(component, min_size=1, max_size=4).map("/".join)
valid_tag = st.tuples(st.sampled_from("abcXYZ019_"),
                      st.text("abcXYZ019_.-", max_size=127)).map("".join)
valid_digest = st.one_of(st.binary(max_size=64).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest()),
                         st.binary(max_size=64).map(lambda b: "sha512:" + hashlib.sha512(b).hexdigest()))
any_text = st.one_of(st.text(max_size=300), header_text)


@FAST
@given(st.one_of(valid_name, any_text, st.text("a/._-", max_size=300)))
@example("a" * (NAME_MAX + 1))
def test_names_parse_or_are_name_invalid(name):
    try:
        assert parse_name(name) == name
    except RegistryError as e:
        assert e.code == "NAME_INVALID"
        return
    assert NAME.fullmatch(name) and len(name) <= NAME_MAX


@FAST
@given(st.one_of(valid_tag, valid_digest, any_text))
@example("sha256:totallywrong")
@example("sha256:" + "A" * 64)
def test_references_parse_or_are_typed_errors(reference):
    for parse in (parse_reference, parse_tag, parse_digest):
        try:
            assert parse(reference) == reference
        except RegistryError as e:
            assert e.code in ("DIGEST_INVALID", "MANIFEST_INVALID")
    if re.fullmatch(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}", reference):
        assert parse_digest(reference) == reference


ROUTER = Router(cfg.load(environ={}).upstreams)


@FAST
@given(st.one_of(valid_name, any_text), st.none() | any_text, st.none() | any_text)
def test_routing_is_a_route_or_a_typed_error(name, ns, prefix):
    try:
        route = ROUTER.route(name, ns=ns, prefix=prefix)
    except RegistryError as e:
        assert e.code in ("NAME_INVALID", "NAME_UNKNOWN")
        return
    assert NAME.fullmatch(route.name)


# -- Range ---------------------------------------------------------------------------------

range_spec = st.one_of(
    st.tuples(numbers, numbers).map(lambda t: f"{t[0]}-{t[1]}"),
    numbers.map(lambda n: f"{n}-"), numbers.map(lambda n: f"-{n}"),
    st.integers(0, 300).map(str).flatmap(lambda a: st.integers(0, 300).map(lambda b: f"{a}-{b}")),
    st.integers(0, 300).map(lambda n: f"-{n}"), st.integers(0, 300).map(lambda n: f"{n}-"),
    header_text)
range_header = st.one_of(
    st.lists(range_spec, max_size=20).map(lambda specs: "bytes=" + ",".join(specs)),
    st.tuples(st.sampled_from(["bytes", "BYTES", "items", " bytes ", ""]), header_text)
      .map("=".join),
    header_text)


def requested(header: str, size: int) -> tuple[int, set[int]] | None:
    """A slow, obviously correct reading of a well-formed range set: how many ranges it
    has and the byte offsets they select; None if it is not one (it must be ignored)."""
    def number(digits: str) -> int:
        digits = digits.lstrip("0") or "0"
        return int(digits) if len(digits) <= 30 else 10 ** 30

    unit, equals, rest = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip(" \t") for s in rest.split(",") if s.strip(" \t")]
    if not specs:
        return None
    selected: set[int] = set()
    for spec in specs:
        m = re.fullmatch(r"([0-9]*)-([0-9]*)", spec)
        if not m or (not m.group(1) and not m.group(2)):
            return None
        if m.group(1):
            first = number(m.group(1))
            last = number(m.group(2)) if m.group(2) else size - 1
            if m.group(2) and last < first:
                return None
            selected.update(range(first, min(last, size - 1) + 1))
        else:
            selected.update(range(max(size - number(m.group(2)), 0), size))
    return len(specs), selected


@FAST
@given(range_header, st.integers(0, 400), st.integers(1, 20))
@example("bytes=" + ",".join(["0-"] * 64), 100, 16)
@example("bytes=" + "9" * 5000 + "-", 100, 16)
@example("bytes=0-" + "9" * 5000, 100, 16)
def test_range_is_ignored_satisfied_or_416(header, size, max_ranges):
    expected = requested(header, size)
    try:
        ranges = parse_ranges(header, size, max_ranges)
    except RangeInvalid as e:
        assert e.status == 416 and e.headers == {"Content-Range": f"bytes */{size}"}
        assert expected is not None and expected[1] == set()
        return
    if ranges is None:  # ignored: invalid, too many ranges, or nothing to range over
        assert expected is None or expected[0] > max_ranges or size == 0
        return
    assert expected is not None and expected[0] <= max_ranges
    assert 1 <= len(ranges) <= max_ranges
    assert all(0 <= start < end <= size for start, end in ranges)
    assert all(a[1] <= b[0] for a, b in pairwise(ranges))  # ascending, disjoint
    # Exactly the bytes asked for: no more (no amplification), no fewer.
    assert set().union(*(range(s, e) for s, e in ranges)) == expected[1]


# -- upstream answers: Content-Range, WWW-Authenticate, tag-list Link, manifests ------------

@FAST
@given(st.one_of(
    header_text,
    st.tuples(numbers, numbers, numbers | st.just("*")).map(lambda t: f"bytes {t[0]}-{t[1]}/{t[2]}")))
@example("bytes 5-9/" + "9" * 5000)
@example("bytes " + "9" * 5000 + "-9/10")
def test_upstream_content_range_parses_or_is_unavailable(value):
    try:
        first, total = _content_range(value)
    except Unavailable:
        return
    assert isinstance(first, int) and (total is None or isinstance(total, int))
    m = re.fullmatch(r"bytes ([0-9]+)-[0-9]+/([0-9]+|\*)", value)
    if m:
        assert first == int(m.group(1))
        assert total == (None if m.group(2) == "*" else int(m.group(2)))


token = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+.^_`|~-",
                min_size=1, max_size=12)
quoted = st.text(st.characters(max_codepoint=0xFF, blacklist_characters="\r\n"), max_size=40)
challenge = st.tuples(token, st.dictionaries(token, quoted, max_size=4))


def render(scheme: str, params: dict[str, str]) -> str:
    values = ", ".join('{}="{}"'.format(k, v.replace("\\", "\\\\").replace('"', '\\"'))
                       for k, v in params.items())
    return f"{scheme} {values}".rstrip()


@FAST
@given(st.one_of(st.lists(header_text, max_size=3),
                 st.lists(challenge, min_size=1, max_size=3)))
@example([("Negotiate", {}), ("Basic", {"realm": "registry"})])  # found: the Basic was lost
def test_www_authenticate_parses_every_challenge(headers):
    if headers and isinstance(headers[0], tuple):
        expected = [(s.lower(), {k.lower(): v for k, v in p.items()}) for s, p in headers]
        parsed = parse_challenges([", ".join(render(s, p) for s, p in headers)])
        assert [(c.scheme, c.params) for c in parsed] == expected
        return
    for c in parse_challenges(headers):
        assert c.scheme == c.scheme.lower() and isinstance(c.params, dict)


EXPECTED = "/v2/library/alpine/tags/list"


@FAST
@given(st.one_of(header_text,
                 st.tuples(header_text, st.sampled_from(['rel="next"', "rel=next", ""]))
                   .map(lambda t: f"<{t[0]}>; {t[1]}"),
                 st.text("<>;\" rel=next/", max_size=30)))
@example('<abc; rel="next"')
@example('>a<; rel="next"')
def test_tag_list_link_is_a_path_on_the_same_list_or_none(link):
    target = _next_link(SimpleNamespace(headers={"Link": link}), EXPECTED)
    assert target is None or target.split("?")[0] == EXPECTED


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["manifests", "layers", "blobs", "config", "digest",
                                       "fsLayers", "blobSum", "mediaType", "subject", "x"]),
                      children, max_size=5),
    max_leaves=30)


def nested(depth: int) -> bytes:
    return b'{"manifests": ' + b"[" * depth + b"]" * depth + b"}"


@FAST
@given(st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=300),
                 st.integers(1, 5000).map(nested)))
@example(nested(5000))
# Found by atheris: a path in an ignored field reached the usage ledger as a "reference".
@example(b'{"layers": [], "manifests": [{"digest": "sha256:../../../../etc"}]}')
def test_manifest_references_are_digests_or_empty(body):
    found = references(body)
    assert isinstance(found, list)
    assert all(re.fullmatch(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}", d) for d in found)


# -- config values from the environment ----------------------------------------------------

ENV_KEYS = [f"MIRROR_{section.upper()}_{field.name.upper()}"
            for section, cls in cfg.SECTIONS.items() for field in dataclasses.fields(cls)]
env_value = st.one_of(header_text, numbers, st.sampled_from(
    ["true", "0", "90%", "1.5", "200GiB", "5m", "-1", "nan", "inf", "1e999", "9" * 400 + "GiB",
     "127.0.0.1:5000", "http://[::1", "text", "json"]))


@SLOW
@given(st.dictionaries(st.one_of(st.sampled_from(ENV_KEYS),
                                 st.sampled_from(ENV_KEYS).map(lambda k: k + "X"),
                                 st.sampled_from(["MIRROR_UPSTREAM_DOCKER_IO_URL",
                                                  "MIRROR_UPSTREAM_DOCKER_IO_TAG_TTL",
                                                  "MIRROR_UPSTREAM_QUAY_IO_PASSWORD"])),
                       env_value, max_size=4))
@example({"MIRROR_STORAGE_MAX_SIZE": "9" * 400 + "GiB"})
@example({"MIRROR_UPSTREAM_DOCKER_IO_URL": "http://[::1"})
def test_config_from_the_environment_loads_or_is_a_config_error(environ):
    environ = {"MIRROR_STORAGE_ROOT": "/tmp/mirror-fuzz", **environ}
    try:
        config = cfg.load(environ=environ)
    except cfg.ConfigError as e:
        for var, value in environ.items():  # a secret's value is never echoed
            others = [v for k, v in environ.items() if k != var]
            if var.endswith("PASSWORD") and len(value) > 3 and not any(value in v for v in others):
                assert value not in str(e)
        return
    assert isinstance(config, cfg.Config)


# -- through the HTTP API: upload Content-Range, pushed manifests --------------------------

@pytest.fixture(scope="module")
def api(upstream, tmp_path_factory):
    """A mirror on its own thread, and a plain blocking HTTP client for hypothesis."""
    thread = ServerThread("fuzzed-mirror").start()
    port = thread.serve(make_app(mirror_config(tmp_path_factory.mktemp("fuzz"), upstream.url)))

    def request(method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    yield request
    thread.stop()


def is_oci_error(status: int, headers: dict[str, str], body: bytes, codes: set[str]) -> bool:
    return (headers.get("content-type") == "application/json"
            and json.loads(body)["errors"][0]["code"] in codes)


# Values http.client will put in a header (no CR/LF, latin-1).
header_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)


@SLOW
@given(st.one_of(header_value,
                 st.tuples(numbers, numbers).map(lambda t: f"{t[0]}-{t[1]}"),
                 st.tuples(st.integers(0, 20), st.integers(0, 20)).map(lambda t: f"{t[0]}-{t[1]}")),
       st.binary(max_size=16))
@example("0-" + "9" * 5000, b"x")
@example("bytes=0-1", b"xy")
@example("0-10737418240", b"")  # announces one byte past hosted.max_upload_size: 413
def test_upload_content_range_is_accepted_or_a_typed_error(api, content_range, chunk):
    status, headers, _ = api("POST", "/v2/fuzz/uploads/blobs/uploads/")
    assert status == 202
    location = headers["location"]
    try:
        status, headers, body = api("PATCH", location, chunk, {
            "Content-Range": content_range, "Content-Type": "application/octet-stream"})
    finally:
        api("DELETE", location)  # uploads per client are limited
    assert status in (202, 400, 413, 416, 431), (status, body)
    if status == 202:
        if content_range.strip(" \t"):  # an empty header is no range at all
            m = re.fullmatch(r"(?:bytes[ =])?([0-9]+)-([0-9]+)", content_range.strip())
            assert m and int(m.group(1)) == 0 and int(m.group(2)) == len(chunk) - 1
        assert headers["range"] == f"0-{max(len(chunk) - 1, 0)}"
    elif status == 413:  # a range that ends past hosted.max_upload_size (10 GiB)
        m = re.fullmatch(r"(?:bytes[ =])?([0-9]+)-([0-9]+)", content_range.strip())
        assert m and int(m.group(2)) + 1 > 10 << 30
        assert is_oci_error(status, headers, body, {"BLOB_UPLOAD_INVALID"})
    elif status == 431:  # the header itself is past limits.max_field_size
        assert len(content_range) > 8000
        assert is_oci_error(status, headers, body, {"UNSUPPORTED"})
    else:  # UNSUPPORTED: a byte aiohttp's parser refuses in a header (DEL)
        assert is_oci_error(status, headers, body, {"BLOB_UPLOAD_INVALID", "UNSUPPORTED"})


MEDIA_TYPES = ["application/vnd.oci.image.manifest.v1+json",
               "application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.v2+json",
               "application/vnd.docker.distribution.manifest.list.v2+json", "", "text/plain",
               "application/json; charset=utf-8"]
descriptor = st.fixed_dictionaries({}, optional={
    "mediaType": st.sampled_from(MEDIA_TYPES), "size": st.integers(-1, 10 ** 20),
    "digest": st.one_of(valid_digest, st.text(max_size=40),
                        st.sampled_from(["sha256:../../../../../../etc/passwd", "a\x00b",
                                         "../" * 20 + "etc/passwd", "../" * 20 + "etc",
                                         "sha256:" + "0" * 64])),
    "urls": st.lists(st.text(max_size=10), max_size=2)})
manifest_document = st.fixed_dictionaries({}, optional={
    "schemaVersion": st.integers(0, 3), "mediaType": st.sampled_from(MEDIA_TYPES),
    "config": descriptor | json_values, "layers": st.lists(descriptor, max_size=3) | json_values,
    "manifests": st.lists(descriptor, max_size=3) | json_values,
    "subject": descriptor | json_values, "annotations": json_values})


@SLOW
@given(st.one_of(manifest_document.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200),
                 st.integers(1, 5000).map(nested)),
       st.sampled_from(MEDIA_TYPES), st.one_of(valid_tag, valid_digest))
@example(nested(5000), MEDIA_TYPES[0], "v1")
@example(json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPES[0],
                     "layers": [{"digest": "sha256:../../../../../../etc/passwd"}]}).encode(),
         MEDIA_TYPES[0], "v1")
# Found: a descriptor "digest" that is a path was stat()-ed as a blob file — /etc/passwd
# "existed", so the manifest was stored (201); a NUL in it was a 500.
@example(json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPES[0], "layers": [],
                     "config": {"digest": "../" * 20 + "etc/passwd"}}).encode(), MEDIA_TYPES[0], "v1")
@example(json.dumps({"schemaVersion": 2, "layers": [{"digest": "a\x00b"}]}).encode(),
         MEDIA_TYPES[0], "v1")
@example(json.dumps({"schemaVersion": 2, "layers": [],
                     "manifests": [{"digest": "sha256:../../../../etc"}]}).encode(),
         MEDIA_TYPES[0], "v2")
# Found: a subject whose "digest" holds a control character went out in the OCI-Subject
# header, which aiohttp refused: the connection was dropped with no answer.
@example(b'{"subject": {"digest": "\\u001f"}}', MEDIA_TYPES[0], "a")
def test_pushed_manifest_is_stored_or_a_typed_error(api, body, media_type, reference):
    status, headers, answer = api("PUT", f"/v2/fuzz/pushed/manifests/{reference}", body,
                                  {"Content-Type": media_type} if media_type else {})
    assert status in (201, 400, 404, 413), (status, answer)
    if status == 201:
        assert headers["docker-content-digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
        for digest in stored_references(body, media_type):  # digests only, never a path
            assert re.fullmatch(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}", digest)
    else:
        assert is_oci_error(status, headers, answer, {
            "MANIFEST_INVALID", "MANIFEST_BLOB_UNKNOWN", "DIGEST_INVALID", "NAME_UNKNOWN",
            "MANIFEST_UNKNOWN"})


def stored_references(body: bytes, media_type: str) -> list[str]:
    """What a stored manifest refers to: the descriptors its type uses (an index's
    manifests, an image's config and layers) and what the usage ledger records."""
    document = json.loads(body)
    kind = media_type.partition(";")[0].strip() or document.get("mediaType") or MEDIA_TYPES[0]
    used = (document.get("manifests") if kind in LIST_TYPES
            else [document.get("config")] + list(document.get("layers") or []))
    return [d["digest"] for d in used or [] if isinstance(d, dict) and "digest" in d] \
        + references(body)


@pytest.mark.parametrize("link, target", [
    # Distribution's and Harbor's middle pages: the previous page first, then the next.
    (f'<{EXPECTED}?n=2>; rel="prev", <{EXPECTED}?n=2&last=d>; rel="next"',
     f"{EXPECTED}?n=2&last=d"),
    (f"<{EXPECTED}?last=b>; rel=next", f"{EXPECTED}?last=b"),  # RFC 8288 allows it unquoted
    (f'<https://r.example{EXPECTED}?last=b>; title="x"; REL="last next"',
     f"{EXPECTED}?last=b"),
    (f'<{EXPECTED}?n=2>; rel="prev"', None),  # the last page: no next
    ('</v2/other/tags/list?last=b>; rel="next"', None),  # another list is never followed
])
def test_tag_list_next_link_is_found_among_several_links(link, target):
    assert _next_link(SimpleNamespace(headers={"Link": link}), EXPECTED) == target


@pytest.mark.parametrize("value, seconds", [
    ("120", 120.0),
    (" 7 ", 7.0),
    # RFC 9110's other form, an HTTP-date: 90 s after the clock below.
    ("Wed, 02 Dec 2026 05:01:30 GMT", 90.0),
    ("Wed, 02 Dec 2026 04:00:00 GMT", 0.0),  # already past
    ("", 1.0), ("soon", 1.0), ("-5", 1.0),
])
def test_retry_after_is_read_in_both_of_its_forms(value, seconds):
    now = datetime(2026, 12, 2, 5, 0, 0, tzinfo=timezone.utc).timestamp()
    assert retry_delay(value, now=lambda: now) == seconds
