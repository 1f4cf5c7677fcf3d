"""The OCI distribution-spec conformance suite, translated request for request, against the mirror.

Source: github.com/opencontainers/distribution-spec, directory conformance/. Two suites:

* v1.1.1 (`test_v1_1_1_*`): the Ginkgo suite of the v1.1.x line (00_conformance_suite_test.go,
  01_pull_test.go, 02_push_test.go, 03_discovery_test.go, 04_management_test.go, setup.go,
  image.go). Every `g.Specify` of the four workflows is one test case, named "<Context> /
  <spec string>", run in the suite's order against ONE registry shared by the four workflows
  (as the suite does), with the settings of a plain run: all four workflows enabled, setup not
  skipped (no OCI_TAG_NAME/OCI_TAG_LIST/...), OCI_NAMESPACE=myorg/myrepo,
  OCI_CROSSMOUNT_NAMESPACE=myorg/other, OCI_DELETE_MANIFEST_BEFORE_BLOBS unset (setup.go
  defaults it to true, so the `if deleteManifestBeforeBlobs` teardown specs are the ones that
  exist). OCI_AUTOMATIC_CROSSMOUNT is taken as 1 (the mirror mounts from its shared store).
  A spec guarded by RunOnlyIf on an earlier answer that this mirror always gives (a 201
  mount, delete allowed) asserts that answer. Left out: the four specs a run against this
  mirror never executes — setup from OCI_TAG_NAME / OCI_TAG_LIST, the
  OCI_AUTOMATIC_CROSSMOUNT=0 case (the mirror always mounts from its shared store), and
  "Cross-mounting of nonexistent blob should yield session id", which runs only when the
  mount of an existing blob was refused with 202 (here it is 201; the 202 session answer
  for a blob that exists nowhere is checked by "Cross-mounting of a blob without the from
  argument should yield session id").
* main (`test_main_*`): the rewritten suite on the main branch ("conformance v2": run.go,
  api.go, testdata.go, config.go) with its default configuration (version "1.1"). It has no
  `Specify`; its unit is the `ChildRun` tree of run.go, so each case here is one of its
  children ("ping", "empty / referrers", "sha256 blobs / chunked out-of-order", "image /
  push", ...), sending what api.go sends. Where that suite only downgrades a result to "skip"
  (errRegUnsupported: a 202 fallback instead of 201, 405 on delete, a range request answered
  with the whole blob, no OCI-Filters-Applied) the case passes with a `SuiteSkip` warning.

Chaining: each suite has one module-scoped mirror and its cases share state in order, as
the Go closures do; a case run alone (-k) may fail for lack of its predecessors.

The mirror runs with no upstream (a hosted-only registry): a name nothing was pushed to yet
is answered by the router (NAME_UNKNOWN) instead of by some remote registry.
"""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import io
import json
import os
import random
import tarfile
import warnings
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from mirror.app import make_app
from tests.conftest import mirror_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_PRE = "application/vnd.oci.image.layer.v1."
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZ = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCTET = "application/octet-stream"


class SuiteSkip(UserWarning):
    """The main-branch suite would report this child as "skip" (registry unsupported), not fail."""


def sha(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def rand_text() -> str:
    """Go's crypto/rand.Text(): 26 base32 characters."""
    return base64.b32encode(os.urandom(20)).decode()[:26]


# ------------------------------------------------------------------------------------------
# HTTP: one request, as the suites' clients send it, and a printable record of the exchange
# ------------------------------------------------------------------------------------------

SHOWN = ("Location", "Range", "Content-Range", "Content-Type", "Content-Length",
         "Docker-Content-Digest", "Docker-Upload-UUID", "OCI-Subject", "OCI-Filters-Applied",
         "OCI-Chunk-Min-Length", "OCI-Tag")


@dataclass
class Resp:
    method: str
    url: str
    request: str  # what was sent besides the URL
    status: int
    headers: CIMultiDictProxy
    body: bytes

    def describe(self) -> str:
        hdrs = ", ".join(f"{k}: {v}" for k in SHOWN for v in self.headers.getall(k, []))
        body = self.body[:300].decode(errors="replace") if self.body else ""
        return (f"{self.method} {self.url} [{self.request}] -> {self.status} [{hdrs}]"
                + (f" {body}" if body else ""))

    def location(self) -> str:
        return self.headers.get("Location", "")

    def json(self):
        return json.loads(self.body)


class Http:
    def __init__(self, base: str, session: aiohttp.ClientSession, user_agent: str):
        self.base = URL(base)
        self.session = session
        self.user_agent = user_agent

    def url(self, target: str | URL) -> URL:
        return self.base.join(URL(target) if isinstance(target, str) else target)

    async def do(self, method: str, target: str | URL, *, query: dict | None = None,
                 headers: list[tuple[str, str]] | tuple = (), body: bytes | None = None,
                 chunked: bool = False) -> Resp:
        """`body` with `chunked` goes out with Transfer-Encoding: chunked (Go, for a body of
        unknown length); otherwise with its Content-Length. POST/PUT/PATCH without a body
        carry Content-Length: 0, as Go's client sends them."""
        url = self.url(target)
        if query:
            url = url.update_query(query)
        hdrs = CIMultiDict(headers)
        hdrs.setdefault("User-Agent", self.user_agent)
        kwargs: dict = {}
        sent = "no body"
        if body is not None and chunked:
            async def stream(data=body):
                yield data
            kwargs["data"] = stream()
            sent = f"chunked body {len(body)} bytes"
        elif body is not None:
            kwargs["data"] = body
            sent = f"body {len(body)} bytes"
        elif method in ("POST", "PUT", "PATCH"):
            kwargs["data"] = b""
            sent = "Content-Length: 0"
        async with self.session.request(method, url, headers=hdrs, allow_redirects=False,
                                        skip_auto_headers=("Accept", "Content-Type"),
                                        **kwargs) as r:
            data = await r.read()
            shown = "; ".join(f"{k}: {v}" for k, v in hdrs.items() if k != "User-Agent")
            return Resp(method, str(url), "; ".join(x for x in (shown, sent) if x),
                        r.status, r.headers, data)


async def start_registry(root: Path, user_agent: str) -> tuple[TestServer, aiohttp.ClientSession, Http]:
    # A TestServer by hand, not pytest-aiohttp's `aiohttp_server`: that fixture is function
    # scoped, and each suite's cases run in order against one registry in a module-scoped
    # fixture on the module's loop (pushes first, then the pulls and deletes of those
    # pushes), so a server per test would lose the state the next case reads.
    config = mirror_config(root, "http://127.0.0.1:9", upstreams=())
    server = TestServer(make_app(config), host="127.0.0.1", port=0)
    await server.start_server()
    session = aiohttp.ClientSession(auto_decompress=False)
    return server, session, Http(f"http://127.0.0.1:{server.port}", session, user_agent)


@dataclass
class Case:
    group: str
    name: str
    fn: Callable[..., Awaitable]

    @property
    def id(self) -> str:
        return f"{self.group} / {self.name}"


def ids(cases: list[Case]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for c in cases:
        n = seen[c.id] = seen.get(c.id, 0) + 1
        out.append(c.id if n == 1 else f"{c.id} #{n}")
    return out


# ==========================================================================================
# v1.1.1: the Ginkgo suite
# ==========================================================================================

NAMESPACE = "myorg/myrepo"  # OCI_NAMESPACE
CROSSMOUNT = "myorg/other"  # OCI_CROSSMOUNT_NAMESPACE
TEST_TAG = "tagtest0"  # testTagName
EMPTY_LAYER_TAG = "emptylayer"  # emptyLayerTestTag
NONEXISTENT_MANIFEST = ".INVALID_MANIFEST_NAME"
ERROR_CODES = ["BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
               "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN",
               "MANIFEST_UNVERIFIED", "NAME_INVALID", "NAME_UNKNOWN", "SIZE_INVALID",
               "TAG_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED"]
# setup.go layerBase64String: a gzipped tarball with one test.txt.
LAYER_B64 = ("H4sIAAAAAAAAA+3OQQrCMBCF4a49xXgBSUnaHMCTRBptQRNpp6i3t0UEV7oqIv7fYgbmzeJpHHSjVy0"
             "WZCa1c/MufWVe94N3RWlrZ72x3k/30nhbFWKWLPU0Dhp6keJ8im//PuU/6pZH2WVtYx8b0Sz7LjWSR5VLG6YRBumSzOlGtjkd+qD"
             "jMWiX07Befbs7AAAAAAAAAAAAAAAAAPyzO34MnqoAKAAA")
REF_TYPE_A = "application/vnd.nhl.peanut.butter.bagel"
REF_TYPE_B = "application/vnd.nba.strawberry.jam.croissant"
REF_TYPE_INDEX = "application/vnd.food.stand"
ANNOTATION_KEY = "org.opencontainers.conformance.test"


@dataclass
class TestBlob:
    __test__ = False

    content: bytes
    digest: str

    @property
    def length(self) -> str:
        return str(len(self.content))


def go_indent(document: dict) -> bytes:
    """json.MarshalIndent(v, "", "\\t")."""
    return json.dumps(document, indent="\t").encode()


def gdesc(media_type: str, digest: str, size: int, *, data: bytes | None = None,
          new_field: bytes | None = None, annotations: dict | None = None) -> dict:
    """image.go's descriptor: newUnspecifiedField has no omitempty (nil []byte is null)."""
    d: dict = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        d["annotations"] = dict(sorted(annotations.items()))
    if data:
        d["data"] = b64(data)
    d["newUnspecifiedField"] = None if new_field is None else b64(new_field)
    return d


class GinkgoData:
    """setup.go init(): the blobs and manifests of the suite, with fresh random content."""

    def __init__(self):
        rng = random.Random()
        self.configs: list[TestBlob] = []
        for _ in range(16):  # numWorkflows = 1 << 4
            author = "".join(rng.choice("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmno"
                                        "pqrstuvwxyz-") for _ in range(16))
            content = go_indent({"author": author, "architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers", "diff_ids": []}})
            self.configs.append(TestBlob(content, sha(content)))
        self.layer = TestBlob(base64.b64decode(LAYER_B64), "")
        self.layer.digest = sha(self.layer.content)
        layers = [gdesc(OCI_LAYER_GZ, self.layer.digest, len(self.layer.content))]
        self.manifests: list[TestBlob] = []
        for cfg in self.configs:
            content = go_indent({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": gdesc(OCI_CONFIG, cfg.digest, len(cfg.content), data=cfg.content,
                                new_field=b"hello world"),
                "layers": layers})
            self.manifests.append(TestBlob(content, sha(content)))
        # used in the push test: no mediaType field, no layers
        cfg = self.configs[1]
        self.empty_layer_manifest = go_indent({
            "schemaVersion": 2,
            "config": gdesc(OCI_CONFIG, cfg.digest, len(cfg.content), data=cfg.content,
                            new_field=b"hello world"),
            "layers": []})
        self.empty_layer_manifest_digest = sha(self.empty_layer_manifest)
        self.blob_a = TestBlob(rng.randbytes(42), "")  # randomBlob(42, seed+1)
        self.blob_a.digest = sha(self.blob_a.content)
        self.setup_chunked_blob(42)
        self.empty_json = TestBlob(b"{}", sha(b"{}"))
        empty_desc = {"mediaType": OCI_EMPTY, "digest": self.empty_json.digest, "size": 2,
                      "newUnspecifiedField": None}
        self.ref_blob_a = TestBlob(b"NHL Peanut Butter on my NHL bagel", "")
        self.ref_blob_a.digest = sha(self.ref_blob_a.content)
        self.ref_blob_b = TestBlob(b"NBA Strawberry Jam on my NBA croissant", "")
        self.ref_blob_b.digest = sha(self.ref_blob_b.content)
        self.annotation_values: dict[str, str] = {}

        def subject(m: TestBlob) -> dict:
            return gdesc(OCI_MANIFEST, m.digest, len(m.content))

        def referrer(document: dict) -> TestBlob:
            content = go_indent(document)
            blob = TestBlob(content, sha(content))
            if "annotations" in document:
                self.annotation_values[blob.digest] = document["annotations"][ANNOTATION_KEY]
            return blob

        m4, m3 = self.manifests[4], self.manifests[3]
        self.refs_a_config = referrer({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": gdesc(REF_TYPE_A, self.ref_blob_a.digest, len(self.ref_blob_a.content)),
            "layers": [empty_desc], "subject": subject(m4),
            "annotations": {ANNOTATION_KEY: "test config a"}})
        self.refs_b_config = referrer({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": gdesc(REF_TYPE_B, self.ref_blob_b.digest, len(self.ref_blob_b.content)),
            "layers": [empty_desc], "subject": subject(m4),
            "annotations": {ANNOTATION_KEY: "test config b"}})
        self.refs_a_layer = referrer({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": REF_TYPE_A,
            "config": empty_desc,
            "layers": [gdesc(REF_TYPE_A, self.ref_blob_a.digest, len(self.ref_blob_a.content))],
            "subject": subject(m4), "annotations": {ANNOTATION_KEY: "test layer a"}})
        self.refs_b_layer = referrer({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": REF_TYPE_B,
            "config": empty_desc,
            "layers": [gdesc(REF_TYPE_B, self.ref_blob_b.digest, len(self.ref_blob_b.content))],
            "subject": subject(m4), "annotations": {ANNOTATION_KEY: "test layer b"}})
        # the same as B, but its subject (manifests[3]) is never pushed by this workflow
        self.refs_c_layer = referrer({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": REF_TYPE_B,
            "config": empty_desc,
            "layers": [gdesc(REF_TYPE_B, self.ref_blob_b.digest, len(self.ref_blob_b.content))],
            "subject": subject(m3)})
        self.refs_index = referrer({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "artifactType": REF_TYPE_INDEX,
            "manifests": [gdesc(OCI_MANIFEST, self.refs_a_config.digest,
                                len(self.refs_a_config.content)),
                          gdesc(OCI_MANIFEST, self.refs_a_layer.digest,
                                len(self.refs_a_layer.content))],
            "subject": subject(m4), "annotations": {ANNOTATION_KEY: "test index"}})
        self.dummy_digest = sha(b"hello world")

    def setup_chunked_blob(self, size: int) -> None:
        self.blob_b = os.urandom(size)  # randomBlob(size, seed+2)
        self.blob_b_digest = sha(self.blob_b)
        half = size // 2 + 1
        self.chunk1, self.chunk2 = self.blob_b[:half], self.blob_b[half:]
        self.chunk1_range = f"0-{len(self.chunk1) - 1}"
        self.chunk2_range = f"{len(self.chunk1)}-{len(self.blob_b) - 1}"


class Ginkgo:
    """One run of the suite: the registry, the data, and each workflow's closure variables."""

    def __init__(self, http: Http):
        self.http = http
        self.d = GinkgoData()
        self.pull = SimpleNamespace(tag="")
        self.push = SimpleNamespace(last=None, prev=None, empty_layer_ref="")
        self.discovery = SimpleNamespace(num_tags=4, tag_list=[])
        self.management = SimpleNamespace(tag_to_delete="", num_tags=0, blob_delete_allowed=True)

    async def do(self, method: str, path: str, name: str = NAMESPACE, **kw) -> Resp:
        return await self.http.do(method, path.replace("<name>", name), **kw)

    async def push_blob(self, blob: TestBlob) -> None:
        """The suite's setup upload: POST (status unchecked), then PUT ?digest= with the body."""
        resp = await self.do("POST", "/v2/<name>/blobs/uploads/")
        resp = await self.do("PUT", rel(resp), query={"digest": blob.digest},
                             headers=[("Content-Type", OCTET)], body=blob.content)
        expect(is2xx(resp.status), resp, "status >= 200 and < 300")

    async def put_manifest(self, reference: str, content: bytes,
                           media_type: str = OCI_MANIFEST) -> Resp:
        return await self.do("PUT", f"/v2/<name>/manifests/{reference}",
                             headers=[("Content-Type", media_type)], body=content)


def rel(resp: Resp) -> str:
    """reggie's GetRelativeLocation: the Location header without scheme and host."""
    loc = URL(resp.location())
    return str(loc.relative()) if loc.is_absolute() else resp.location()


def is2xx(status: int) -> bool:
    return 200 <= status < 300


def expect(condition: bool, resp: Resp | None, what: str) -> None:
    if not condition:
        raise AssertionError(f"expected {what}\n  {resp.describe() if resp else '(no response)'}")


def expect_status(resp: Resp, *codes: int) -> None:
    expect(resp.status in codes, resp, f"status in {list(codes)}")


def error_code(resp: Resp) -> str | None:
    try:
        return resp.json()["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


PULL: list[Case] = []
PUSH: list[Case] = []
DISCOVERY: list[Case] = []
MANAGEMENT: list[Case] = []


def spec(workflow: list[Case], context: str, name: str):
    def register(fn):
        workflow.append(Case(context, name, fn))
        return fn
    return register


# ---------------------------------------------------------------- 01_pull_test.go

@spec(PULL, "Setup", "Populate registry with test blob")
async def _(s: Ginkgo):
    await s.push_blob(s.d.configs[0])


@spec(PULL, "Setup", "Populate registry with test blob")
async def _(s: Ginkgo):
    await s.push_blob(s.d.configs[1])


@spec(PULL, "Setup", "Populate registry with test layer")
async def _(s: Ginkgo):
    await s.push_blob(s.d.layer)


@spec(PULL, "Setup", "Populate registry with test manifest")
async def _(s: Ginkgo):
    s.pull.tag = TEST_TAG
    resp = await s.put_manifest(s.pull.tag, s.d.manifests[0].content)
    expect(is2xx(resp.status), resp, "status >= 200 and < 300")


@spec(PULL, "Setup", "Populate registry with test manifest")
async def _(s: Ginkgo):
    resp = await s.put_manifest(s.d.manifests[1].digest, s.d.manifests[1].content)
    expect(is2xx(resp.status), resp, "status >= 200 and < 300")


@spec(PULL, "Pull blobs", "HEAD request to nonexistent blob should result in 404 response")
async def _(s: Ginkgo):
    resp = await s.do("HEAD", f"/v2/<name>/blobs/{s.d.dummy_digest}")
    expect_status(resp, 404)


@spec(PULL, "Pull blobs", "HEAD request to existing blob should yield 200")
async def _(s: Ginkgo):
    resp = await s.do("HEAD", f"/v2/<name>/blobs/{s.d.configs[0].digest}")
    expect_status(resp, 200)
    if h := resp.headers.get("Docker-Content-Digest"):
        expect(h == s.d.configs[0].digest, resp, f"Docker-Content-Digest {s.d.configs[0].digest}")


@spec(PULL, "Pull blobs", "GET nonexistent blob should result in 404 response")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/blobs/{s.d.dummy_digest}")
    expect_status(resp, 404)


@spec(PULL, "Pull blobs", "GET request to existing blob URL should yield 200")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/blobs/{s.d.configs[0].digest}")
    expect_status(resp, 200)


ACCEPT_MANIFEST = [("Accept", OCI_MANIFEST)]


@spec(PULL, "Pull manifests", "HEAD request to nonexistent manifest should return 404")
async def _(s: Ginkgo):
    resp = await s.do("HEAD", f"/v2/<name>/manifests/{NONEXISTENT_MANIFEST}")
    expect_status(resp, 404)


async def _head_manifest(s: Ginkgo, reference: str, digest: str) -> None:
    resp = await s.do("HEAD", f"/v2/<name>/manifests/{reference}", headers=ACCEPT_MANIFEST)
    expect_status(resp, 200)
    if h := resp.headers.get("Docker-Content-Digest"):
        expect(h == digest, resp, f"Docker-Content-Digest {digest}")


@spec(PULL, "Pull manifests", "HEAD request to manifest[0] path (digest) should yield 200 response")
async def _(s: Ginkgo):
    await _head_manifest(s, s.d.manifests[0].digest, s.d.manifests[0].digest)


@spec(PULL, "Pull manifests", "HEAD request to manifest[1] path (digest) should yield 200 response")
async def _(s: Ginkgo):
    await _head_manifest(s, s.d.manifests[1].digest, s.d.manifests[1].digest)


@spec(PULL, "Pull manifests", "HEAD request to manifest path (tag) should yield 200 response")
async def _(s: Ginkgo):
    assert s.pull.tag, "Expect(tag).ToNot(BeEmpty())"
    await _head_manifest(s, s.pull.tag, s.d.manifests[0].digest)


@spec(PULL, "Pull manifests", "GET nonexistent manifest should return 404")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/manifests/{NONEXISTENT_MANIFEST}")
    expect_status(resp, 404)


@spec(PULL, "Pull manifests", "GET request to manifest[0] path (digest) should yield 200 response")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/manifests/{s.d.manifests[0].digest}",
                      headers=ACCEPT_MANIFEST)
    expect_status(resp, 200)


@spec(PULL, "Pull manifests", "GET request to manifest[1] path (digest) should yield 200 response")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/manifests/{s.d.manifests[1].digest}",
                      headers=ACCEPT_MANIFEST)
    expect_status(resp, 200)


@spec(PULL, "Pull manifests", "GET request to manifest path (tag) should yield 200 response")
async def _(s: Ginkgo):
    assert s.pull.tag, "Expect(tag).ToNot(BeEmpty())"
    resp = await s.do("GET", f"/v2/<name>/manifests/{s.pull.tag}", headers=ACCEPT_MANIFEST)
    expect_status(resp, 200)


def _oci_error_400(resp: Resp) -> None:
    expect_status(resp, 400, 404)
    if resp.status == 400:
        expect(error_code(resp) in ERROR_CODES, resp, "errors[0].code among the OCI error codes")


@spec(PULL, "Error codes", "400 response body should contain OCI-conforming JSON message")
async def _(s: Ginkgo):
    # The latest v1.1.x form: a GET (resty drops the body of a GET).
    resp = await s.do("GET", "/v2/<name>/manifests/sha256:totallywrong",
                      headers=[("Content-Type", OCI_MANIFEST)])
    _oci_error_400(resp)


@spec(PULL, "Error codes", "400 response body should contain OCI-conforming JSON message "
                           "(v1.1.0 form: PUT)")
async def _(s: Ginkgo):
    resp = await s.put_manifest("sha256:totallywrong", b"blablabla")
    _oci_error_400(resp)


def _deleted(resp: Resp, *also: int) -> None:
    expect(is2xx(resp.status) or resp.status in also, resp, f"2xx or one of {list(also)}")


@spec(PULL, "Teardown", "Delete manifest[0] created in setup")
async def _(s: Ginkgo):
    _deleted(await s.do("DELETE", f"/v2/<name>/manifests/{s.d.manifests[0].digest}"), 405)


@spec(PULL, "Teardown", "Delete manifest[1] created in setup")
async def _(s: Ginkgo):
    _deleted(await s.do("DELETE", f"/v2/<name>/manifests/{s.d.manifests[1].digest}"), 405)


@spec(PULL, "Teardown", "Delete config[0] blob created in setup")
async def _(s: Ginkgo):
    _deleted(await s.do("DELETE", f"/v2/<name>/blobs/{s.d.configs[0].digest}"), 404, 405)


@spec(PULL, "Teardown", "Delete config[1] blob created in setup")
async def _(s: Ginkgo):
    _deleted(await s.do("DELETE", f"/v2/<name>/blobs/{s.d.configs[1].digest}"), 404, 405)


@spec(PULL, "Teardown", "Delete layer blob created in setup")
async def _(s: Ginkgo):
    _deleted(await s.do("DELETE", f"/v2/<name>/blobs/{s.d.layer.digest}"), 404, 405)


# ---------------------------------------------------------------- 02_push_test.go

@spec(PUSH, "Blob Upload Streamed", "PATCH request with blob in body should yield 202 response")
async def _(s: Ginkgo):
    resp = await s.do("POST", "/v2/<name>/blobs/uploads/")
    expect(resp.location() != "", resp, "a Location header")
    resp = await s.do("PATCH", rel(resp), headers=[("Content-Type", OCTET)],
                      body=s.d.blob_a.content)
    expect_status(resp, 202)
    s.push.last = resp


@spec(PUSH, "Blob Upload Streamed", "PUT request to session URL with digest should yield 201 response")
async def _(s: Ginkgo):
    assert s.push.last is not None, "Expect(lastResponse).ToNot(BeNil())"
    # SetHeader("Content-Length", testBlobALength) with no body: Go's transport drops a
    # Content-Length header and sends the request's real length, 0.
    resp = await s.do("PUT", rel(s.push.last), query={"digest": s.d.blob_a.digest},
                      headers=[("Content-Type", OCTET)])
    expect_status(resp, 201)
    expect(resp.location() != "", resp, "a Location header")


@spec(PUSH, "Blob Upload Monolithic", "GET nonexistent blob should result in 404 response")
async def _(s: Ginkgo):
    expect_status(await s.do("GET", f"/v2/<name>/blobs/{s.d.dummy_digest}"), 404)


@spec(PUSH, "Blob Upload Monolithic", "POST request with digest and blob should yield a 201 or 202")
async def _(s: Ginkgo):
    cfg = s.d.configs[1]
    resp = await s.do("POST", "/v2/<name>/blobs/uploads/", query={"digest": cfg.digest},
                      headers=[("Content-Type", OCTET)], body=cfg.content)
    expect(resp.location() != "", resp, "a Location header")
    expect_status(resp, 201, 202)
    s.push.last = resp


@spec(PUSH, "Blob Upload Monolithic",
      "GET request to blob URL from prior request should yield 200 or 404 based on response code")
async def _(s: Ginkgo):
    assert s.push.last is not None, "Expect(lastResponse).ToNot(BeNil())"
    resp = await s.do("GET", f"/v2/<name>/blobs/{s.d.configs[1].digest}")
    expect_status(resp, 404 if s.push.last.status == 202 else 200)


@spec(PUSH, "Blob Upload Monolithic", "POST request should yield a session ID")
async def _(s: Ginkgo):
    resp = await s.do("POST", "/v2/<name>/blobs/uploads/")
    expect_status(resp, 202)
    s.push.last = resp


@spec(PUSH, "Blob Upload Monolithic", "PUT upload of a blob should yield a 201 Response")
async def _(s: Ginkgo):
    cfg = s.d.configs[1]
    resp = await s.do("PUT", rel(s.push.last), query={"digest": cfg.digest},
                      headers=[("Content-Type", OCTET)], body=cfg.content)
    expect(resp.location() != "", resp, "a Location header")
    expect_status(resp, 201)


@spec(PUSH, "Blob Upload Monolithic", "GET request to existing blob should yield 200 response")
async def _(s: Ginkgo):
    expect_status(await s.do("GET", f"/v2/<name>/blobs/{s.d.configs[1].digest}"), 200)


@spec(PUSH, "Blob Upload Monolithic", "PUT upload of a layer blob should yield a 201 Response")
async def _(s: Ginkgo):
    resp = await s.do("POST", "/v2/<name>/blobs/uploads/")
    resp = await s.do("PUT", rel(resp), query={"digest": s.d.layer.digest},
                      headers=[("Content-Type", OCTET)], body=s.d.layer.content)
    expect(resp.location() != "", resp, "a Location header")
    expect_status(resp, 201)


@spec(PUSH, "Blob Upload Monolithic", "GET request to existing layer should yield 200 response")
async def _(s: Ginkgo):
    expect_status(await s.do("GET", f"/v2/<name>/blobs/{s.d.layer.digest}"), 200)


@spec(PUSH, "Blob Upload Chunked", "Out-of-order blob upload should return 416")
async def _(s: Ginkgo):
    resp = await s.do("POST", "/v2/<name>/blobs/uploads/")  # Content-Length: 0
    expect(resp.location() != "", resp, "a Location header")
    if min_size := resp.headers.get("OCI-Chunk-Min-Length"):
        expect(min_size.isdigit(), resp, "OCI-Chunk-Min-Length to be an integer")
        if int(min_size) > len(s.d.chunk1):  # rebuild the chunked blob above the minimum
            s.d.setup_chunked_blob(int(min_size) * 2 - 2)
    resp = await s.do("PATCH", rel(resp), headers=[("Content-Type", OCTET),
                                                   ("Content-Range", s.d.chunk2_range)],
                      body=s.d.chunk2)
    expect_status(resp, 416)


@spec(PUSH, "Blob Upload Chunked", "PATCH request with first chunk should return 202")
async def _(s: Ginkgo):
    resp = await s.do("POST", "/v2/<name>/blobs/uploads/")
    expect(resp.location() != "", resp, "a Location header")
    s.push.prev = resp
    resp = await s.do("PATCH", rel(resp), headers=[("Content-Type", OCTET),
                                                   ("Content-Range", s.d.chunk1_range)],
                      body=s.d.chunk1)
    expect_status(resp, 202)
    expect(resp.headers.get("Range") == s.d.chunk1_range, resp, f"Range: {s.d.chunk1_range}")
    s.push.last = resp


@spec(PUSH, "Blob Upload Chunked", "Retry previous blob chunk should return 416")
async def _(s: Ginkgo):
    resp = await s.do("PATCH", rel(s.push.prev), headers=[("Content-Type", OCTET),
                                                          ("Content-Range", s.d.chunk1_range)],
                      body=s.d.chunk1)
    expect_status(resp, 416)


@spec(PUSH, "Blob Upload Chunked", "Get on stale blob upload should return 204 with a range and location")
async def _(s: Ginkgo):
    resp = await s.do("GET", rel(s.push.prev))
    expect_status(resp, 204)
    expect(resp.location() != "", resp, "a Location header")
    expect(resp.headers.get("Range") == s.d.chunk1_range, resp, f"Range: {s.d.chunk1_range}")
    s.push.last = resp


@spec(PUSH, "Blob Upload Chunked", "PATCH request with second chunk should return 202")
async def _(s: Ginkgo):
    resp = await s.do("PATCH", rel(s.push.last), headers=[("Content-Range", s.d.chunk2_range),
                                                          ("Content-Type", OCTET)],
                      body=s.d.chunk2)
    expect_status(resp, 202)
    expect(resp.location() != "", resp, "a Location header")
    s.push.last = resp


@spec(PUSH, "Blob Upload Chunked", "PUT request with digest should return 201")
async def _(s: Ginkgo):
    resp = await s.do("PUT", rel(s.push.last), query={"digest": s.d.blob_b_digest},
                      headers=[("Content-Type", OCTET)])  # Content-Length: 0
    expect_status(resp, 201)
    expect(resp.location() != "", resp, "a Location header")


@spec(PUSH, "Cross-Repository Blob Mount",
      "Cross-mounting of a blob without the from argument should yield session id")
async def _(s: Ginkgo):
    resp = await s.do("POST", "/v2/<name>/blobs/uploads/", name=CROSSMOUNT,
                      query={"mount": s.d.dummy_digest})
    expect_status(resp, 202)
    expect(resp.location() != "", resp, "a Location header (GetAbsoluteLocation not empty)")


@spec(PUSH, "Cross-Repository Blob Mount",
      "POST request to mount another repository's blob should return 201 or 202")
async def _(s: Ginkgo):
    resp = await s.do("POST", "/v2/<name>/blobs/uploads/", name=CROSSMOUNT,
                      query={"mount": s.d.blob_a.digest, "from": NAMESPACE})
    expect_status(resp, 201, 202)
    s.push.last = resp


@spec(PUSH, "Cross-Repository Blob Mount",
      "GET request to test digest within cross-mount namespace should return 200")
async def _(s: Ginkgo):
    # The suite runs this only after a 201 (RunOnlyIf); this mirror mounts, so it must be one.
    expect_status(s.push.last, 201)
    want = f"/v2/{CROSSMOUNT}/blobs/{s.d.blob_a.digest}"
    expect(rel(s.push.last) == want, s.push.last, f"Location {want}")
    expect_status(await s.do("GET", rel(s.push.last)), 200)


@spec(PUSH, "Cross-Repository Blob Mount",
      "Cross-mounting without from, and automatic content discovery enabled should return a 201")
async def _(s: Ginkgo):
    # RunOnlyIf(runAutomaticCrossmountTest), RunOnlyIf(automaticCrossmountEnabled): run here
    # as with OCI_AUTOMATIC_CROSSMOUNT=1, the mirror mounting any blob of its shared store.
    expect_status(s.push.last, 201)
    resp = await s.do("POST", "/v2/<name>/blobs/uploads/", name=CROSSMOUNT,
                      query={"mount": s.d.blob_a.digest})
    expect_status(resp, 201)


@spec(PUSH, "Manifest Upload", "GET nonexistent manifest should return 404")
async def _(s: Ginkgo):
    expect_status(await s.do("GET", f"/v2/<name>/manifests/{NONEXISTENT_MANIFEST}"), 404)


@spec(PUSH, "Manifest Upload", "PUT should accept a manifest upload")
async def _(s: Ginkgo):
    for i in range(4):
        resp = await s.put_manifest(f"test{i}", s.d.manifests[1].content)
        expect(resp.location() != "", resp, "a Location header")
        expect_status(resp, 201)


@spec(PUSH, "Manifest Upload", "Registry should accept a manifest upload with no layers")
async def _(s: Ginkgo):
    resp = await s.put_manifest(EMPTY_LAYER_TAG, s.d.empty_layer_manifest)
    if resp.status == 201:
        s.push.empty_layer_ref = resp.location()
        expect(resp.location() != "", resp, "a Location header")
    else:
        warnings.warn(f"image manifest with no layers is not supported: {resp.describe()}",
                      SuiteSkip, stacklevel=2)


@spec(PUSH, "Manifest Upload", "GET request to manifest URL (digest) should yield 200 response")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/manifests/{s.d.manifests[1].digest}",
                      headers=ACCEPT_MANIFEST)
    expect_status(resp, 200)


@spec(PUSH, "Teardown", "Delete manifest created in tests")
async def _(s: Ginkgo):
    _deleted(await s.do("DELETE", f"/v2/<name>/manifests/{s.d.manifests[1].digest}"), 405)
    if s.push.empty_layer_ref:
        _deleted(await s.do("DELETE", f"/v2/<name>/manifests/{s.d.empty_layer_manifest_digest}"),
                 405)


@spec(PUSH, "Teardown", "Delete config blob created in tests")
async def _(s: Ginkgo):
    _deleted(await s.do("DELETE", f"/v2/<name>/blobs/{s.d.configs[1].digest}"), 404, 405)


@spec(PUSH, "Teardown", "Delete layer blob created in setup")
async def _(s: Ginkgo):
    _deleted(await s.do("DELETE", f"/v2/<name>/blobs/{s.d.layer.digest}"), 404, 405)


# ---------------------------------------------------------------- 03_discovery_test.go

@spec(DISCOVERY, "Setup", "Populate registry with test blob")
async def _(s: Ginkgo):
    await s.push_blob(s.d.configs[2])


@spec(DISCOVERY, "Setup", "Populate registry with test layer")
async def _(s: Ginkgo):
    await s.push_blob(s.d.layer)


@spec(DISCOVERY, "Setup", "Populate registry with test tags")
async def _(s: Ginkgo):
    for i in range(s.discovery.num_tags):
        tag = f"test{i}"
        s.discovery.tag_list.append(tag)
        resp = await s.put_manifest(tag, s.d.manifests[2].content)
        expect(is2xx(resp.status), resp, "status >= 200 and < 300")
    resp = await s.do("GET", "/v2/<name>/tags/list")
    s.discovery.tag_list = tag_list_of(resp)


def tag_list_of(resp: Resp) -> list[str]:
    try:
        return list(resp.json().get("tags") or [])
    except (ValueError, AttributeError):
        return []


@spec(DISCOVERY, "Setup", "References setup")
async def _(s: Ginkgo):
    d = s.d
    assert d.empty_json.digest == ("sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c0"
                                   "60f61caaff8a")
    await s.push_blob(d.empty_json)
    await s.push_blob(d.ref_blob_a)  # before the image manifest is pushed

    async def put(blob: TestBlob, subject: str, media_type: str = OCI_MANIFEST) -> None:
        resp = await s.put_manifest(blob.digest, blob.content, media_type)
        expect(is2xx(resp.status), resp, "status >= 200 and < 300")
        expect(resp.headers.get("OCI-Subject") == subject, resp, f"OCI-Subject: {subject}")

    await put(d.refs_a_config, d.manifests[4].digest)
    await put(d.refs_a_layer, d.manifests[4].digest)
    await put(d.refs_index, d.manifests[4].digest, OCI_INDEX)
    await s.push_blob(d.configs[4])
    await s.push_blob(d.layer)
    resp = await s.put_manifest(TEST_TAG, d.manifests[4].content)
    expect(is2xx(resp.status), resp, "status >= 200 and < 300")
    await s.push_blob(d.ref_blob_b)  # after the image manifest is pushed
    await put(d.refs_b_config, d.manifests[4].digest)
    await put(d.refs_b_layer, d.manifests[4].digest)
    await put(d.refs_c_layer, d.manifests[3].digest)  # to a subject that does not exist


@spec(DISCOVERY, "Test content discovery endpoints (listing tags)",
      "GET request to list tags should yield 200 response")
async def _(s: Ginkgo):
    resp = await s.do("GET", "/v2/<name>/tags/list")
    expect_status(resp, 200)
    s.discovery.tag_list = tag_list_of(resp)
    s.discovery.num_tags = len(s.discovery.tag_list)


@spec(DISCOVERY, "Test content discovery endpoints (listing tags)",
      "GET number of tags should be limitable by `n` query parameter")
async def _(s: Ginkgo):
    n = s.discovery.num_tags // 2
    resp = await s.do("GET", "/v2/<name>/tags/list", query={"n": str(n)})
    expect_status(resp, 200)
    s.discovery.tag_list = tag_list_of(resp)
    expect(len(s.discovery.tag_list) == n, resp, f"{n} tags")


@spec(DISCOVERY, "Test content discovery endpoints (listing tags)",
      "GET start of tag is set by `last` query parameter")
async def _(s: Ginkgo):
    n = s.discovery.num_tags // 2
    resp = await s.do("GET", "/v2/<name>/tags/list", query={"n": str(n)})
    s.discovery.tag_list = tag_list_of(resp)
    assert len(s.discovery.tag_list) >= n, f"tagList[numResults-1] out of range: {resp.describe()}"
    last = s.discovery.tag_list[n - 1]
    resp = await s.do("GET", "/v2/<name>/tags/list", query={"n": str(n), "last": last})
    expect_status(resp, 200)
    # The suite then checks the list of the *first* response again (tagList is not
    # reassigned): at most n tags, containing its own last element.
    assert len(s.discovery.tag_list) <= n and last in s.discovery.tag_list


def _index_of(resp: Resp) -> dict:
    expect_status(resp, 200)
    expect(resp.headers.get("Content-Type") == OCI_INDEX, resp, f"Content-Type: {OCI_INDEX}")
    try:
        return resp.json()
    except ValueError:
        raise AssertionError(f"referrers response is not JSON\n  {resp.describe()}") from None


def _check_annotations(s: Ginkgo, resp: Resp, manifests: list[dict]) -> None:
    for m in manifests:
        annotations = m.get("annotations") or {}
        expect(len(annotations) == 1, resp, f"exactly one annotation on {m.get('digest')}")
        expect(annotations.get(ANNOTATION_KEY) == s.d.annotation_values.get(m.get("digest")),
               resp, f"annotation {ANNOTATION_KEY} of {m.get('digest')}")


@spec(DISCOVERY, "Test content discovery endpoints (listing references)",
      "GET request to nonexistent blob should result in empty 200 response")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/referrers/{s.d.dummy_digest}")
    index = _index_of(resp)
    expect(len(index.get("manifests") or []) == 0, resp, "no manifests")


@spec(DISCOVERY, "Test content discovery endpoints (listing references)",
      "GET request to existing blob should yield 200")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/referrers/{s.d.manifests[4].digest}")
    manifests = _index_of(resp).get("manifests") or []
    expect(len(manifests) == 5, resp, "5 manifests")
    expect(manifests[0]["digest"] != manifests[1]["digest"], resp, "distinct referrers")
    _check_annotations(s, resp, manifests)


@spec(DISCOVERY, "Test content discovery endpoints (listing references)",
      "GET request to existing blob with filter should yield 200")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/referrers/{s.d.manifests[4].digest}",
                      query={"artifactType": REF_TYPE_A})
    manifests = _index_of(resp).get("manifests") or []
    if resp.headers.get("OCI-Filters-Applied"):
        expect(len(manifests) == 2, resp, "2 manifests")
        expect(resp.headers["OCI-Filters-Applied"] == "artifactType", resp,
               "OCI-Filters-Applied: artifactType")
    else:
        expect(len(manifests) == 5, resp, "5 manifests")
        warnings.warn("filtering by artifact-type is not implemented", SuiteSkip, stacklevel=2)
    _check_annotations(s, resp, manifests)


@spec(DISCOVERY, "Test content discovery endpoints (listing references)",
      "GET request to missing manifest should yield 200")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/referrers/{s.d.manifests[3].digest}")
    manifests = _index_of(resp).get("manifests") or []
    expect(len(manifests) == 1, resp, "1 manifest")
    expect(manifests[0]["digest"] == s.d.refs_c_layer.digest, resp, "the C layer artifact")


@spec(DISCOVERY, "Teardown", "Delete created manifest & associated tags")
async def _(s: Ginkgo):
    d = s.d
    for ref in (d.refs_index.digest, d.manifests[2].digest, d.manifests[4].digest,
                d.refs_a_config.digest, d.refs_a_layer.digest, TEST_TAG, d.refs_b_config.digest,
                d.refs_b_layer.digest, d.refs_c_layer.digest):
        _deleted(await s.do("DELETE", f"/v2/<name>/manifests/{ref}"), 405, 404)


@spec(DISCOVERY, "Teardown", "Delete config blob created in tests")
async def _(s: Ginkgo):
    _deleted(await s.do("DELETE", f"/v2/<name>/blobs/{s.d.configs[2].digest}"), 405)


@spec(DISCOVERY, "Teardown", "Delete layer blob created in setup")
async def _(s: Ginkgo):
    _deleted(await s.do("DELETE", f"/v2/<name>/blobs/{s.d.layer.digest}"), 405)


@spec(DISCOVERY, "Teardown", "References teardown")
async def _(s: Ginkgo):
    d = s.d
    # deleteManifestBeforeBlobs: the manifests first (already gone: 404 is accepted)
    for ref in (d.refs_index.digest, d.refs_a_config.digest, d.refs_a_layer.digest,
                d.manifests[4].digest, d.refs_b_config.digest, d.refs_b_layer.digest):
        _deleted(await s.do("DELETE", f"/v2/<name>/manifests/{ref}"), 405, 404)
    for blob in (d.configs[4], d.ref_blob_a, d.ref_blob_b, d.empty_json):
        _deleted(await s.do("DELETE", f"/v2/<name>/blobs/{blob.digest}"), 405, 404)


# ---------------------------------------------------------------- 04_management_test.go

@spec(MANAGEMENT, "Setup", "Populate registry with test config blob")
async def _(s: Ginkgo):
    await s.push_blob(s.d.configs[3])


@spec(MANAGEMENT, "Setup", "Populate registry with test layer")
async def _(s: Ginkgo):
    await s.push_blob(s.d.layer)


@spec(MANAGEMENT, "Setup", "Populate registry with test tag")
async def _(s: Ginkgo):
    s.management.tag_to_delete = "tagtest0"
    resp = await s.put_manifest(s.management.tag_to_delete, s.d.manifests[3].content)
    expect(is2xx(resp.status), resp, "status >= 200 and < 300")


@spec(MANAGEMENT, "Setup", "Check how many tags there are before anything gets deleted")
async def _(s: Ginkgo):
    resp = await s.do("GET", "/v2/<name>/tags/list")
    expect_status(resp, 200)
    s.management.num_tags = len(resp.json().get("tags") or [])


@spec(MANAGEMENT, "Manifest delete",
      "DELETE request to manifest tag should return 202, unless tag deletion is disallowed (400/405)")
async def _(s: Ginkgo):
    resp = await s.do("DELETE", f"/v2/<name>/manifests/{s.management.tag_to_delete}")
    expect_status(resp, 400, 202, 405)
    if resp.status == 400:
        expect(error_code(resp) == "UNSUPPORTED", resp, "errors[0].code UNSUPPORTED")


@spec(MANAGEMENT, "Manifest delete",
      "DELETE request to manifest (digest) should yield 202 response unless already deleted")
async def _(s: Ginkgo):
    resp = await s.do("DELETE", f"/v2/<name>/manifests/{s.d.manifests[3].digest}")
    expect_status(resp, 202, 404)


@spec(MANAGEMENT, "Manifest delete",
      "GET request to deleted manifest URL should yield 404 response, unless delete is disallowed")
async def _(s: Ginkgo):
    resp = await s.do("GET", f"/v2/<name>/manifests/{s.d.manifests[3].digest}")
    expect_status(resp, 404, 200)


@spec(MANAGEMENT, "Manifest delete", "GET request to tags list should reflect manifest deletion")
async def _(s: Ginkgo):
    resp = await s.do("GET", "/v2/<name>/tags/list")
    expect_status(resp, 200)
    tags = resp.json().get("tags") or []
    expect(len(tags) < s.management.num_tags, resp, f"fewer than {s.management.num_tags} tags")


@spec(MANAGEMENT, "Blob delete", "DELETE request to blob URL should yield 202 response")
async def _(s: Ginkgo):
    resp = await s.do("DELETE", f"/v2/<name>/blobs/{s.d.configs[3].digest}")
    expect_status(resp, 202, 404, 405)
    resp = await s.do("DELETE", f"/v2/<name>/blobs/{s.d.layer.digest}")
    expect_status(resp, 202, 404, 405)
    if resp.status == 405:
        s.management.blob_delete_allowed = False


@spec(MANAGEMENT, "Blob delete", "GET request to deleted blob URL should yield 404 response")
async def _(s: Ginkgo):
    # RunOnlyIf(blobDeleteAllowed): hosted.delete is on by default, so it must have been.
    assert s.management.blob_delete_allowed
    expect_status(await s.do("GET", f"/v2/<name>/blobs/{s.d.configs[3].digest}"), 404)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def v1_1_1(tmp_path_factory) -> Ginkgo:
    server, session, http = await start_registry(tmp_path_factory.mktemp("conformance-v1.1.1"),
                                                 "distribution-spec-conformance-tests")
    yield Ginkgo(http)
    await session.close()
    await server.close()


@pytest.mark.parametrize("case", PULL, ids=ids(PULL))
async def test_v1_1_1_pull(v1_1_1: Ginkgo, case: Case):
    await case.fn(v1_1_1)


@pytest.mark.parametrize("case", PUSH, ids=ids(PUSH))
async def test_v1_1_1_push(v1_1_1: Ginkgo, case: Case):
    await case.fn(v1_1_1)


@pytest.mark.parametrize("case", DISCOVERY, ids=ids(DISCOVERY))
async def test_v1_1_1_content_discovery(v1_1_1: Ginkgo, case: Case):
    await case.fn(v1_1_1)


@pytest.mark.parametrize("case", MANAGEMENT, ids=ids(MANAGEMENT))
async def test_v1_1_1_content_management(v1_1_1: Ginkgo, case: Case):
    await case.fn(v1_1_1)


# ==========================================================================================
# main: the rewritten suite (run.go / api.go / testdata.go), default configuration "1.1"
# ==========================================================================================

REPO1, REPO2 = "conformance/repo1", "conformance/repo2"  # config.go defaults
CHUNK_MIN = 1024  # config.go chunkMin
EMPTY_DIGEST = sha(b"")
EXAMPLE_1 = "application/vnd.example.oci.conformance.v1"
EXAMPLE_2 = "application/vnd.example.oci.conformance.v2"


@dataclass(frozen=True)
class V2Config:
    """config.go defaults for version "" / "stable" / "1.1" (the "dev" profile flips the
    commented ones)."""
    blob_digest_header: bool = False  # dev: True
    manifest_digest_header: bool = False  # dev: True
    upload_cancel: bool = False  # dev: True
    tag_param: bool = False  # dev: True
    mount_anonymous: bool = True
    referrer: bool = True
    empty_blob: bool = True
    sha512: bool = True


class Fail(AssertionError):
    """An error the suite reports as FAIL."""


class Unsupported(Exception):
    """errRegUnsupported: the suite reports the child as skipped, not failed."""


class Disabled(Exception):
    """errAPITestDisabled: the configuration turns this API test off."""


def want_status(r: Resp, *codes: int) -> None:
    if r.status not in codes:
        raise Fail(f"unexpected status code, expected one of {list(codes)}, received "
                   f"{r.status}\n    {r.describe()}")


def want_header(r: Resp, key: str, value: str = "") -> None:
    current = r.headers.getall(key, [])
    if value == "" and not current:
        raise Fail(f"missing header {key!r}\n    {r.describe()}")
    if value != "" and value not in current:
        raise Fail(f"header value mismatch for {key!r}, expected {value!r}, received "
                   f"{current}\n    {r.describe()}")


def want_body(r: Resp, body: bytes) -> None:
    if r.body != body:
        raise Fail(f"body contents mismatch, expected {len(body)} bytes, received "
                   f"{len(r.body)} bytes\n    {r.describe()}")


def verify_digest(r: Resp | None, digest: str, require: bool) -> None:
    header = r.headers.get("Docker-Content-Digest", "") if r else ""
    if not header and require:
        raise Fail(f"registry did not return a Docker-Content-Digest header\n    "
                   f"{r.describe() if r else ''}")
    if header and digest and header != digest:
        raise Fail(f"Docker-Content-Digest header value expected {digest!r}, received "
                   f"{header!r}\n    {r.describe()}")


def detect_media_type(body: bytes) -> str:
    try:
        document = json.loads(body)
        return document.get("mediaType") or OCI_MANIFEST
    except (ValueError, AttributeError):
        return OCI_MANIFEST


def detect_subject(body: bytes) -> dict | None:
    try:
        subject = json.loads(body).get("subject")
        return subject if isinstance(subject, dict) else None
    except (ValueError, AttributeError):
        return None


# ---------------------------------------------------------------- testdata.go

def go_json(document: dict) -> bytes:
    """json.Marshal: compact; map keys (annotations) are sorted."""
    return json.dumps(document, separators=(",", ":")).encode()


def odesc(media_type: str, digest: str, size: int, *, data: bytes | None = None,
          urls: list[str] | None = None) -> dict:
    """image-spec's Descriptor, omitempty fields left out."""
    d: dict = {"mediaType": media_type, "digest": digest, "size": size}
    if urls:
        d["urls"] = urls
    if data:
        d["data"] = b64(data)
    return d


def with_extra_field(document: dict) -> dict:
    """genAddJSONFields: one more top-level field the spec does not define."""
    return {**document, f"org.{rand_text()}": rand_text()}


def annotations_of(o: dict) -> dict | None:
    annotations = o.get("annotations")
    if o.get("annotation_uniq"):
        annotations = dict(annotations or {})
        annotations["org.example." + rand_text()] = rand_text()
    return dict(sorted(annotations.items())) if annotations else None


class TestData:
    """testdata.go's testData and its gen* functions; `o` holds the genWith* options given."""

    __test__ = False

    def __init__(self, name: str):
        self.name = name
        self.tags: dict[str, str] = {}
        self.tag_pushed: set[str] = set()
        self.desc: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.man_order: list[str] = []
        self.referrers: dict[str, list[dict]] = {}
        self.pull_flags: dict[str, set[str]] = {}
        self.push_flags: dict[str, set[str]] = {}

    def add_blob(self, b: bytes, o: dict) -> str:
        digest = sha(b, o.get("algo", "sha256"))
        self.blobs[digest] = b
        self.desc[digest] = odesc(o.get("descriptor_media_type", OCTET), digest, len(b),
                                  data=b if o.get("set_data") else None)
        return digest

    def gen_blob(self, o: dict) -> tuple[str, bytes]:
        b = os.urandom(o.get("blob_size", 2048))
        return self.add_blob(b, o), b

    def gen_layer(self, file_num: int, o: dict) -> tuple[str, str]:
        algo = o.get("algo", "sha256")
        content = (f"Conformance test file contents for file number {file_num}.\n"
                   f"Todays lucky number is {random.getrandbits(63)}\n").encode()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            info = tarfile.TarInfo(f"./conformance-{file_num}.txt")
            info.size, info.mode = len(content), 0o644
            tar.addfile(info, io.BytesIO(content))
        if o.get("comp", "gzip") == "gzip":
            body, media_type = gzip.compress(buf.getvalue(), mtime=0), OCI_LAYER_GZ
        else:
            body, media_type = buf.getvalue(), OCI_LAYER
        dig_c = sha(body, algo)
        dig_uc = sha(b"", algo)  # testdata.go never writes bufUncomp: its digest is of b""
        self.blobs[dig_c] = body
        self.desc[dig_c] = odesc(media_type, dig_c, len(body),
                                 data=body if o.get("set_data") else None)
        self.desc[dig_uc] = odesc(OCI_LAYER, dig_uc, 0)
        return dig_c, dig_uc

    def gen_config(self, platform: dict, layers: list[str], o: dict) -> str:
        algo = o.get("algo", "sha256")
        config = {"author": "OCI Conformance Test", **platform, "config": {},
                  "rootfs": {"type": "layers", "diff_ids": layers}}
        body = go_json(with_extra_field(config) if o.get("extra_field") else config)
        digest = sha(body, algo)
        self.blobs[digest] = body
        self.desc[digest] = odesc(o.get("config_media_type") or OCI_CONFIG, digest, len(body),
                                  data=body if o.get("set_data") else None)
        return digest

    def gen_manifest(self, conf: dict, layers: list[dict], o: dict) -> str:
        algo = o.get("algo", "sha256")
        m: dict = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
        if o.get("artifact_type"):
            m["artifactType"] = o["artifact_type"]
        m["config"], m["layers"] = conf, layers
        if o.get("subject"):
            m["subject"] = o["subject"]
        if annotations := annotations_of(o):
            m["annotations"] = annotations
        body = go_json(with_extra_field(m) if o.get("extra_field") else m)
        digest = sha(body, algo)
        self.manifests[digest] = body
        self.man_order.append(digest)
        self.desc[digest] = odesc(OCI_MANIFEST, digest, len(body),
                                  data=body if o.get("set_data") else None)
        if o.get("subject"):
            self.referrers.setdefault(o["subject"]["digest"], []).append({
                "mediaType": OCI_MANIFEST,
                "artifactType": o.get("artifact_type") or conf["mediaType"],
                "digest": digest, "size": len(body), "annotations": annotations or {}})
        if o.get("tag"):
            self.tags[o["tag"]] = digest
        return digest

    def gen_manifest_full(self, o: dict) -> str:
        g = {"layer_count": 2, "platform": {"architecture": "amd64", "os": "linux"}, **o}
        dig_c_list, dig_uc_list = [], []
        for n in range(g["layer_count"]):
            lmt = g.get("layer_media_type", "")
            if not lmt or lmt.startswith(OCI_LAYER_PRE):
                dig_c, dig_uc = self.gen_layer(n, o)
            else:
                lo = {**o, "descriptor_media_type": lmt}
                if g.get("layer_bytes") is not None:
                    dig_c = dig_uc = self.add_blob(g["layer_bytes"], lo)
                else:
                    dig_c = dig_uc = self.gen_blob(lo)[0]
            dig_c_list.append(dig_c)
            dig_uc_list.append(dig_uc)
        cmt = g.get("config_media_type", "")
        if not cmt or cmt == OCI_CONFIG:
            config_digest = self.gen_config(g["platform"], dig_uc_list, o)
        else:
            config_digest = self.add_blob(g.get("config_bytes", b""),
                                          {**o, "descriptor_media_type": cmt})
        layers = [copy.deepcopy(self.desc[d]) for d in dig_c_list]
        return self.gen_manifest(copy.deepcopy(self.desc[config_digest]), layers, o)

    def gen_index(self, platforms: list[dict | None], manifests: list[str], o: dict) -> str:
        algo = o.get("algo", "sha256")
        ind: dict = {"schemaVersion": 2, "mediaType": OCI_INDEX}
        if o.get("artifact_type"):
            ind["artifactType"] = o["artifact_type"]
        entries = []
        for platform, digest in zip(platforms, manifests):
            d = copy.deepcopy(self.desc[digest])
            if platform:
                d["platform"] = platform
            entries.append(d)
        ind["manifests"] = entries
        if o.get("subject"):
            ind["subject"] = o["subject"]
        if annotations := annotations_of(o):
            ind["annotations"] = annotations
        body = go_json(with_extra_field(ind) if o.get("extra_field") else ind)
        digest = sha(body, algo)
        self.manifests[digest] = body
        self.man_order.append(digest)
        self.desc[digest] = odesc(OCI_INDEX, digest, len(body),
                                  data=body if o.get("set_data") else None)
        if o.get("subject"):
            self.referrers.setdefault(o["subject"]["digest"], []).append({
                "mediaType": OCI_INDEX, "artifactType": o.get("artifact_type", ""),
                "digest": digest, "size": len(body), "annotations": annotations or {}})
        if o.get("tag"):
            self.tags[o["tag"]] = digest
        return digest

    def gen_index_full(self, o: dict) -> str:
        platforms = o.get("platforms", [{"architecture": "amd64", "os": "linux"},
                                        {"architecture": "arm64", "os": "linux"}])
        digests = [self.gen_manifest_full({"platform": p, **o}) for p in platforms]
        return self.gen_index(platforms, digests, o)


AMD64 = {"architecture": "amd64", "os": "linux"}
ARM64 = {"architecture": "arm64", "os": "linux"}
ARTIFACT_OPTS = {"config_media_type": OCI_EMPTY, "config_bytes": b"{}", "layer_count": 1}
CONFORMANCE_ANNOTATION = {"org.opencontainers.conformance": "hello conformance test"}


def generate_data(cfg: V2Config) -> dict[str, TestData]:
    """run.go GenerateData: the data sets, in the order the suite tests them."""
    data: dict[str, TestData] = {}

    def new(name: str, description: str) -> TestData:
        data[name] = TestData(description)
        return data[name]

    new("image", "Image").gen_manifest_full({"tag": "image"})
    new("image-uncompressed", "Image Uncompressed").gen_manifest_full(
        {"tag": "image-uncompressed", "comp": "none"})
    large = {f"large-annotation-{i}": "A" * 10000 for i in range(390)}
    new("large-manifest", "Image with Large Manifest").gen_manifest_full(
        {"tag": "large-manifest", "annotations": large})
    new("index", "Index").gen_index_full({"tag": "index", "platforms": [AMD64, ARM64]})
    td = new("nested-index", "Nested Index")
    dig1 = td.gen_index_full({"platforms": [AMD64, ARM64]})
    dig2 = td.gen_index_full({"platforms": [AMD64, ARM64]})
    td.gen_index([None, None], [dig1, dig2], {"tag": "index-of-index"})
    new("empty-index", "Empty Index").gen_index_full({"tag": "index", "platforms": []})
    new("artifact", "Artifact").gen_manifest_full(
        {"tag": "artifact", "artifact_type": EXAMPLE_1, **ARTIFACT_OPTS,
         "layer_media_type": EXAMPLE_1})
    new("artifact-index", "Artifact Index").gen_index_full(
        {"tag": "artifact-index", "platforms": [AMD64, ARM64], "artifact_type": EXAMPLE_1,
         **ARTIFACT_OPTS, "layer_media_type": EXAMPLE_1})
    new("artifact-without-layers", "Artifact without Layers").gen_manifest_full(
        {"tag": "artifact-without-layers", "artifact_type": EXAMPLE_1, **ARTIFACT_OPTS,
         "layer_bytes": b"{}", "layer_media_type": OCI_EMPTY})
    td = new("artifacts-with-subject", "Artifacts with Subject")
    subject = copy.deepcopy(td.desc[td.gen_manifest_full({"tag": "image"})])
    td.gen_manifest_full({"subject": subject})
    td.gen_manifest_full({"artifact_type": EXAMPLE_1, "annotations": CONFORMANCE_ANNOTATION,
                          "annotation_uniq": True, **ARTIFACT_OPTS,
                          "layer_media_type": EXAMPLE_1, "subject": subject,
                          "tag": "tagged-artifact1"})
    td.gen_manifest_full({"artifact_type": EXAMPLE_2, "annotations": CONFORMANCE_ANNOTATION,
                          "annotation_uniq": True, **ARTIFACT_OPTS, "layer_media_type": OCTET,
                          "subject": subject, "tag": "tagged-artifact2"})
    td = new("index-with-subject", "Index with Subject")
    subject = copy.deepcopy(td.desc[td.gen_index_full({"tag": "index"})])
    td.gen_index_full({"artifact_type": EXAMPLE_1, "annotations": CONFORMANCE_ANNOTATION,
                       "annotation_uniq": True, **ARTIFACT_OPTS, "layer_media_type": EXAMPLE_1,
                       "subject": subject, "tag": "tagged-artifact"})
    new("missing-subject", "Missing Subject").gen_manifest_full(
        {"artifact_type": EXAMPLE_1, "annotations": CONFORMANCE_ANNOTATION,
         "annotation_uniq": True, **ARTIFACT_OPTS, "layer_media_type": EXAMPLE_1,
         "subject": odesc(OCI_MANIFEST, sha(b"missing content"), 123), "tag": "tagged-artifact"})
    new("data-field", "Data Field").gen_manifest_full({"tag": "data-field", "set_data": True})
    td = new("non-distributable-layers", "Non-distributable Layers")
    nd_gz, nd = sha(os.urandom(256)), sha(os.urandom(256))
    layers = [odesc(OCI_LAYER_ND_GZ, nd_gz, 123456,
                    urls=["https://store.example.com/blobs/sha256/" + nd_gz.partition(":")[2]]),
              odesc(OCI_LAYER_ND, nd, 12345,
                    urls=["https://store.example.com/blobs/sha256/" + nd.partition(":")[2]])]
    dig_c, dig_uc = td.gen_layer(1, {})
    layers.append(copy.deepcopy(td.desc[dig_c]))
    config = td.gen_config(AMD64, [sha(os.urandom(256)), nd, dig_uc], {})
    td.gen_manifest(copy.deepcopy(td.desc[config]), layers, {"tag": "non-distributable-image"})
    new("custom-fields", "Custom Fields").gen_index_full(
        {"tag": "custom-fields", "platforms": [AMD64, ARM64], "extra_field": True})
    new("no-layers", "No Layers").gen_manifest_full({"tag": "no-layers", "layer_count": 0})
    if cfg.sha512:  # non-canonical digests: pushed by digest only
        new("sha512", "Digest Algorithm sha512").gen_index_full({"algo": "sha512"})
    if cfg.tag_param:
        for algo in ("sha256",) + (("sha512",) if cfg.sha512 else ()):
            td = new(f"tag-param-{algo}", "Tag Param")
            td.gen_index_full({"tag": f"tag-param-{algo}", "algo": algo})
            for i, digest in enumerate(td.man_order):
                td.tags[f"tag-param-{algo}-{i}"] = digest
                td.push_flags[digest] = {"TagParam"}
    td = new("bad-digest-image", "Bad Digest Image")
    digest = td.gen_manifest_full({})
    td.pull_flags[digest] = {"SkipPullTest"}
    td.push_flags[digest] = {"ExpectBadDigest"}
    td.manifests[digest] += b"  "  # whitespace: the body no longer has that digest
    return data


# ---------------------------------------------------------------- api.go

class Api:
    def __init__(self, http: Http):
        self.http = http

    async def do(self, method: str, url: str | URL, *, headers=(), body: bytes | None = None,
                 content_length: int | None = None) -> Resp:
        """apiWithContentLength sets the length; a body without it goes out chunked."""
        if content_length is not None:
            return await self.http.do(method, url, headers=headers,
                                      body=body if body is not None else b"")
        return await self.http.do(method, url, headers=headers, body=body,
                                  chunked=body is not None)

    def url(self, path: str) -> URL:
        return self.http.url(path)

    async def blob_delete(self, repo: str, digest: str) -> None:
        r = await self.do("DELETE", f"/v2/{repo}/blobs/{digest}")
        want_status(r, 202, 404, 405)
        if r.status == 405:
            raise Unsupported(f"registry returned status 405\n    {r.describe()}")

    async def blob_get(self, repo: str, digest: str, headers=()) -> Resp:
        return await self.do("GET", f"/v2/{repo}/blobs/{digest}", headers=headers)

    async def blob_get_exists_full(self, repo: str, digest: str, td: TestData,
                                   require_digest: bool) -> None:
        r = await self.blob_get(repo, digest)
        want_status(r, 200)
        val = td.blobs.get(digest)
        if val is not None and (len(val) > 0 or digest == EMPTY_DIGEST):
            want_body(r, val)
            want_header(r, "Content-Length", str(len(val)))
        verify_digest(r, digest, require_digest)

    async def blob_head(self, repo: str, digest: str) -> Resp:
        return await self.do("HEAD", f"/v2/{repo}/blobs/{digest}")

    async def blob_head_exists(self, repo: str, digest: str, td: TestData,
                               require_digest: bool) -> None:
        r = await self.blob_head(repo, digest)
        want_status(r, 200)
        want_body(r, b"")
        val = td.blobs.get(digest)
        if val is not None and (len(val) > 0 or digest == EMPTY_DIGEST):
            want_header(r, "Content-Length", str(len(val)))
        verify_digest(r, digest, require_digest)

    async def blob_verify_location(self, base: URL, loc: str, body: bytes) -> None:
        if not loc:
            raise Fail("location header missing")
        r = await self.do("GET", base.join(URL(loc)))
        try:
            want_body(r, body)
            want_status(r, 200)
        except Fail as e:
            raise Fail(f"failed to verify returned location: {e}") from None

    async def blob_mount(self, repo: str, source: str, digest: str, td: TestData,
                         require_digest: bool) -> None:
        body = td.blobs[digest]
        u = self.url(f"/v2/{repo}/blobs/uploads/").update_query(
            {"mount": digest, **({"from": source} if source else {})})
        r = await self.do("POST", u)
        want_status(r, 201, 202)
        loc = r.location()
        if not loc:
            raise Fail(f"blob post did not return a location\n    {r.describe()}")
        unsupported = None
        resp = r
        if r.status == 202:
            u = u.join(URL(loc)).update_query({"digest": digest})
            r2 = await self.do("PUT", u, content_length=len(body),
                               headers=[("Content-Type", OCTET)], body=body)
            want_status(r2, 201)
            loc, resp = r2.location() or loc, r2
            unsupported = f"registry returned status 202, fell back to blob POST+PUT\n    {r.describe()}"
        verify_digest(resp, digest, require_digest)
        await self.blob_verify_location(u, loc, body)
        if unsupported:
            raise Unsupported(unsupported)

    async def blob_patch_chunked(self, repo: str, digest: str, td: TestData, *,
                                 require_digest: bool, out_of_order: bool = False,
                                 put_last: bool = False, bad: bool = False,
                                 min_header: list | None = None) -> None:
        body = td.blobs[digest]
        u = self.url(f"/v2/{repo}/blobs/uploads/")
        r = await self.do("POST", u, content_length=0)
        want_status(r, 202)
        min_str, loc = r.headers.get("OCI-Chunk-Min-Length", ""), r.location()
        if min_header is not None and min_str:
            min_header.append(min_str)
        chunk = len(body) // 3 + 1
        if min_str:
            if not min_str.isdigit():
                raise Fail(f"parsing OCI-Chunk-Min-Length size {min_str!r} failed")
            chunk = max(chunk, int(min_str))
        chunk = min(max(chunk, CHUNK_MIN), len(body))
        last = -1
        resp = None
        while last < len(body) - 1:
            if out_of_order:
                if not loc:
                    raise Fail("blob request did not return a location")
                u = u.join(URL(loc))
                bad_start = last + 1 + chunk
                if bad_start >= len(body):
                    bad_start = 0
                bad_last = min(bad_start + chunk - 1, len(body) - 1)
                method = "PATCH"
                if put_last and bad_last == len(body) - 1:
                    method = "PUT"
                    u = u.update_query({"digest": digest})
                r = await self.do(method, u, content_length=bad_last - bad_start + 1,
                                  headers=[("Content-Type", OCTET),
                                           ("Content-Range", f"{bad_start}-{bad_last}")],
                                  body=body[bad_start:bad_last + 1])
                try:
                    want_status(r, 416)
                except Fail as e:
                    raise Fail(f"blob out of order chunk: {e}") from None
                loc = r.location() or loc
                r = await self.do("GET", u)  # recover: where does the upload stand?
                try:
                    want_status(r, 204)
                except Fail as e:
                    raise Fail(f"blob chunked upload get request: {e}") from None
                loc = r.location() or loc
                range_header = r.headers.get("Range", "")
                if not range_header.startswith("0-"):
                    raise Fail(f"content-range header is missing the 0- prefix: "
                               f"{range_header!r}\n    {r.describe()}")
                try:
                    range_last = int(range_header[2:])
                except ValueError:
                    raise Fail(f"content-range header could not be parsed: {range_header!r}"
                               f"\n    {r.describe()}") from None
                if last >= 0 and range_last != last:
                    raise Fail(f"content-range unexpected, received {range_header!r}, expected "
                               f'"0-{last}"\n    {r.describe()}')
            if not loc:
                raise Fail("blob request did not return a location")
            u = u.join(URL(loc))
            start = last + 1
            last = min(start + chunk - 1, len(body) - 1)
            headers = [("Content-Type", OCTET), ("Content-Range", f"{start}-{last}")]
            if put_last and last == len(body) - 1:
                u = u.update_query({"digest": digest})
                r = await self.do("PUT", u, content_length=last - start + 1, headers=headers,
                                  body=body[start:last + 1])
                if bad:
                    want_status(r, 400)
                else:
                    want_status(r, 201)
                    loc, resp = r.location() or loc, r
            else:
                r = await self.do("PATCH", u, content_length=last - start + 1, headers=headers,
                                  body=body[start:last + 1])
                try:
                    want_status(r, 202)
                except Fail as e:
                    raise Fail(f"blob patch failed: {e}") from None
                loc = r.location() or loc
        if not put_last:
            if not loc:
                raise Fail("blob patch did not return a location")
            u = u.join(URL(loc)).update_query({"digest": digest})
            r = await self.do("PUT", u, content_length=0, headers=[("Content-Type", OCTET)])
            if bad:
                want_status(r, 400)
            else:
                want_status(r, 201)
                loc, resp = r.location() or loc, r
        if bad:
            return
        verify_digest(resp, digest, require_digest)
        await self.blob_verify_location(u, loc, body)

    async def blob_patch_stream(self, repo: str, digest: str, td: TestData, *,
                                require_digest: bool, bad: bool = False) -> None:
        body = td.blobs[digest]
        u = self.url(f"/v2/{repo}/blobs/uploads/")
        r = await self.do("POST", u, content_length=0)
        want_status(r, 202)
        loc = r.location()
        if not loc:
            raise Fail(f"blob post did not return a location\n    {r.describe()}")
        u = u.join(URL(loc))
        r = await self.do("PATCH", u, headers=[("Content-Type", OCTET)], body=body)  # chunked
        want_status(r, 202)
        loc = r.location() or loc
        if not loc:
            raise Fail("blob patch did not return a location")
        u = u.join(URL(loc)).update_query({"digest": digest})
        r = await self.do("PUT", u, content_length=0, headers=[("Content-Type", OCTET)])
        if bad:
            want_status(r, 400)
            return
        want_status(r, 201)
        want_header(r, "Location")
        loc = r.location() or loc
        verify_digest(r, digest, require_digest)
        await self.blob_verify_location(u, loc, body)

    async def blob_post_cancel(self, repo: str) -> None:
        u = self.url(f"/v2/{repo}/blobs/uploads/")
        r = await self.do("POST", u)
        want_status(r, 202)
        if not r.location():
            raise Fail(f"blob post did not return a location\n    {r.describe()}")
        r = await self.do("DELETE", u.join(URL(r.location())), content_length=0)
        want_status(r, 204)

    async def blob_post_only(self, repo: str, digest: str, td: TestData, *,
                             require_digest: bool, bad: bool = False) -> None:
        body = td.blobs[digest]
        u = self.url(f"/v2/{repo}/blobs/uploads/").update_query({"digest": digest})
        r = await self.do("POST", u, content_length=len(body), headers=[("Content-Type", OCTET)],
                          body=body)
        if bad:
            want_status(r, 400, 202)
        else:
            want_status(r, 201, 202)
            want_header(r, "Location")
        loc, resp = r.location(), r
        if r.status == 202:
            u = u.join(URL(loc)).update_query({"digest": digest})
            r2 = await self.do("PUT", u, content_length=len(body),
                               headers=[("Content-Type", OCTET)], body=body)
            want_status(r2, 400 if bad else 201)
            raise Unsupported(f"registry does not support content in the POST, fallback to PUT"
                              f"\n    {r.describe()}")
        if bad:
            return
        verify_digest(resp, digest, require_digest)
        await self.blob_verify_location(u, loc, body)

    async def blob_post_put(self, repo: str, digest: str, td: TestData, *,
                            require_digest: bool, bad: bool = False) -> None:
        body = td.blobs[digest]
        u = self.url(f"/v2/{repo}/blobs/uploads/")
        r = await self.do("POST", u)
        want_status(r, 202)
        loc = r.location()
        if not loc:
            raise Fail(f"blob post did not return a location\n    {r.describe()}")
        u = u.join(URL(loc)).update_query({"digest": digest})
        r = await self.do("PUT", u, content_length=len(body), headers=[("Content-Type", OCTET)],
                          body=body)
        if bad:
            want_status(r, 400)
            return
        want_status(r, 201)
        loc = r.location() or loc
        verify_digest(r, digest, require_digest)
        await self.blob_verify_location(u, loc, body)

    async def manifest_delete(self, repo: str, ref: str) -> None:
        r = await self.do("DELETE", f"/v2/{repo}/manifests/{ref}")
        want_status(r, 202, 404, 400, 405)
        if r.status in (400, 405):
            raise Unsupported(f"registry returned status {r.status}\n    {r.describe()}")

    ACCEPT = (("Accept", OCI_INDEX), ("Accept", OCI_MANIFEST))

    async def manifest_get(self, repo: str, ref: str) -> Resp:
        return await self.do("GET", f"/v2/{repo}/manifests/{ref}", headers=self.ACCEPT)

    async def manifest_head(self, repo: str, ref: str) -> Resp:
        return await self.do("HEAD", f"/v2/{repo}/manifests/{ref}", headers=self.ACCEPT)

    async def manifest_get_exists(self, repo: str, ref: str, digest: str, td: TestData,
                                  require_digest: bool) -> None:
        r = await self.manifest_get(repo, ref)
        want_status(r, 200)
        val = td.manifests.get(digest)
        if val:
            want_body(r, val)
            want_header(r, "Content-Type", detect_media_type(val))
            want_header(r, "Content-Length", str(len(val)))
        verify_digest(r if val else None, digest, require_digest)

    async def manifest_head_exists(self, repo: str, ref: str, digest: str, td: TestData,
                                   require_digest: bool) -> None:
        r = await self.manifest_head(repo, ref)
        want_status(r, 200)
        want_body(r, b"")
        val = td.manifests.get(digest)
        if val:
            want_header(r, "Content-Type", detect_media_type(val))
            want_header(r, "Content-Length", str(len(val)))
        verify_digest(r if val else None, digest, require_digest)

    async def manifest_put(self, repo: str, ref: str, digest: str, td: TestData, *,
                           referrers: bool, bad: bool = False,
                           tag_params: list[str] = ()) -> Resp:
        body = td.manifests[digest]
        media_type = detect_media_type(body)
        u = self.url(f"/v2/{repo}/manifests/{ref}")
        if tag_params:
            u = u.extend_query([("tag", t) for t in tag_params])
        r = await self.do("PUT", u, headers=[("Content-Type", media_type)], body=body)  # chunked
        errs = []
        try:
            want_status(r, 400 if bad else 201)
        except Fail as e:
            errs.append(f"manifest put failed: {e}")
        if referrers and (subject := detect_subject(body)):
            try:
                want_header(r, "OCI-Subject", subject["digest"])
            except Fail as e:
                errs.append(f"manifest put failed: {e}")
        if not bad:
            header = r.headers.get("Docker-Content-Digest", "")
            if header and header != digest:
                errs.append(f"Docker-Content-Digest header value expected {digest!r}, received "
                            f"{header!r}")
            loc = r.location()
            if not loc:
                errs.append(f"blob put did not return a location\n    {r.describe()}")
            else:
                g = await self.do("GET", u.join(URL(loc)), headers=self.ACCEPT)
                try:
                    want_status(g, 200)
                    want_header(g, "Content-Type", media_type)
                    want_header(g, "Content-Length", str(len(body)))
                    want_body(g, body)
                except Fail as e:
                    errs.append(f"failed to verify returned location: {e}")
        if errs:
            raise Fail("\n  ".join(errs))
        return r

    async def ping(self) -> Resp:
        return await self.do("GET", "/v2/")

    async def referrers_list(self, repo: str, digest: str,
                             artifact_type: str | None = None) -> tuple[dict, Resp]:
        u = self.url(f"/v2/{repo}/referrers/{digest}")
        if artifact_type is not None:
            u = u.extend_query({"artifactType": artifact_type})
        r = await self.do("GET", u)
        want_status(r, 200)
        want_header(r, "Content-Type", OCI_INDEX)
        try:
            index = r.json()
        except ValueError:
            raise Fail(f"referrers response is not JSON\n    {r.describe()}") from None
        if index.get("mediaType") != OCI_INDEX or index.get("schemaVersion") != 2:
            raise Fail(f"referrers response is not a valid OCI index (media type and schema "
                       f"version)\n    {r.describe()}")
        return index, r

    async def tag_list(self, repo: str, last: str | None = None) -> list[str]:
        u = self.url(f"/v2/{repo}/tags/list")
        if last is not None:
            u = u.extend_query({"last": last})
        r = await self.do("GET", u)
        if r.status == 404:
            return []
        want_status(r, 200, 404)
        try:
            return list(r.json().get("tags") or [])
        except (ValueError, AttributeError):
            raise Fail(f"response did not match any condition: tag list is not JSON\n    "
                       f"{r.describe()}") from None


# ---------------------------------------------------------------- run.go

BLOB_APIS = ("blob-post-put", "blob-post-only", "blob-patch-stream", "blob-patch-chunked")
BLOB_API_TESTS = ("post only", "post+put", "chunked single", "stream", "mount",
                  "mount anonymous", "mount missing", "post cancel")
CHUNKED_TESTS = ("chunked multi", "chunked multi and put chunk", "chunked out-of-order",
                 "chunked out-of-order and put chunk")
BAD_DIGEST_TESTS = ("bad digest post only", "bad digest post+put", "bad digest chunked",
                    "bad digest chunked and put chunk", "bad digest stream")
RANGE_TESTS = ("range 500-1499", "range 500-", "range -500", "range 2000-5000", "range 500-0",
               "range 5000-10000")


class Outcome:
    """The results of one case's child runs: failures fail the case, skips warn."""

    def __init__(self, runner: V2):
        self.runner = runner
        self.fails: list[str] = []
        self.skips: list[str] = []

    async def step(self, label: str, coro: Awaitable, api: str | None = None) -> bool:
        """Run one child; True when it passed (Go's err == nil)."""
        try:
            await coro
        except Disabled:
            return False
        except Unsupported as e:
            self.skips.append(f"{label}: {e}")
            self.runner.api_bad.add(api)
            return False
        except Fail as e:
            self.fails.append(f"{label}: {e}")
            self.runner.api_bad.add(api)
            return False
        self.runner.api_passed.add(api)
        return True

    def finish(self) -> None:
        for skip in self.skips:
            warnings.warn(f"the suite would report SKIP (unsupported): {skip}", SuiteSkip, stacklevel=2)
        if self.fails:
            pytest.fail("\n".join(self.fails), pytrace=False)


class V2:
    """run.go's runner: TestAll's steps, each as a method returning its Outcome."""

    def __init__(self, http: Http, cfg: V2Config):
        self.api = Api(http)
        self.cfg = cfg
        self.data = generate_data(cfg)
        self.blob_sets: dict[str, tuple[TestData, dict[str, str]]] = {}
        self.min_chunk: dict[str, int] = {}
        self.tested: set[str] = set()
        self.tested_by_algo: dict[str, set[str]] = defaultdict(set)
        self.api_passed: set[str | None] = set()
        self.api_bad: set[str | None] = set()

    # -- pushes (TestPushBlob*)
    def _push(self, api: str, td: TestData, repo: str, digest: str, bad: bool = False):
        rd = self.cfg.blob_digest_header
        if api == "blob-post-put":
            return self.api.blob_post_put(repo, digest, td, require_digest=rd, bad=bad)
        if api == "blob-post-only":
            return self.api.blob_post_only(repo, digest, td, require_digest=rd, bad=bad)
        if api == "blob-patch-stream":
            return self.api.blob_patch_stream(repo, digest, td, require_digest=rd, bad=bad)
        return self.api.blob_patch_chunked(repo, digest, td, require_digest=rd, bad=bad)

    async def push_blob_any(self, o: Outcome, td: TestData, repo: str, digest: str) -> bool:
        algo = digest.partition(":")[0]
        order = [a for a in BLOB_APIS if a not in self.tested]
        order += [a for a in BLOB_APIS if a not in self.tested_by_algo[algo] and a not in order]
        order += [a for a in BLOB_APIS if a in self.api_passed and a not in self.api_bad
                  and a not in order]
        order += [a for a in BLOB_APIS if a not in order]
        for api in order:
            ok = await o.step(f"{api} {digest[:19]}", self._push(api, td, repo, digest), api)
            self.tested.add(api)
            self.tested_by_algo[algo].add(api)
            if ok:
                return True
        return False

    async def head_blob(self, o: Outcome, td: TestData, repo: str, digest: str) -> bool:
        return await o.step(f"blob-head {digest[:19]}", self.api.blob_head_exists(
            repo, digest, td, self.cfg.blob_digest_header))

    async def pull_blob(self, o: Outcome, td: TestData, repo: str, digest: str) -> bool:
        return await o.step(f"blob-get {digest[:19]}", self.api.blob_get_exists_full(
            repo, digest, td, self.cfg.blob_digest_header))

    async def delete_blob(self, o: Outcome, td: TestData, repo: str, digest: str) -> None:
        async def run():
            await self.api.blob_delete(repo, digest)
            r = await self.api.blob_head(repo, digest)  # the delete finished at once
            want_status(r, 404)
        await o.step(f"blob-delete {repo} {digest[:19]}", run())

    # -- ping and the empty repository
    async def ping(self) -> Outcome:
        o = Outcome(self)
        await o.step("ping", self.api.ping())
        return o

    async def empty_tag_list(self) -> Outcome:
        o = Outcome(self)
        await o.step("tag list", self.api.tag_list(REPO1))
        return o

    async def empty_referrers(self) -> Outcome:
        o = Outcome(self)
        await o.step("referrers", self.api.referrers_list(REPO1, sha(rand_text().encode())))
        return o

    # -- TestBlobAPIs
    def blob_set(self, algo: str) -> tuple[TestData, dict[str, str]]:
        if algo not in self.blob_sets:
            td = TestData(f"Blobs {algo}")
            self.data[f"blobs-{algo}"] = td
            digests = {name: td.gen_blob({"blob_size": 512, "algo": algo})[0]
                       for name in BLOB_API_TESTS}
            self.blob_sets[algo] = (td, digests)
            self.min_chunk[algo] = CHUNK_MIN
        return self.blob_sets[algo]

    async def blob_get_missing(self, algo: str) -> Outcome:
        _, digests = self.blob_set(algo)
        o = Outcome(self)

        async def run():
            want_status(await self.api.blob_get(REPO1, digests["post cancel"]), 404)
        await o.step("get-missing", run())
        return o

    async def blob_api(self, algo: str, name: str) -> Outcome:
        td, digests = self.blob_set(algo)
        o = Outcome(self)
        rd = self.cfg.blob_digest_header
        size = self.min_chunk[algo] * 3 - 5
        digest = digests.get(name)
        api = None
        if name == "post only":
            api = "blob-post-only"
            ok = await o.step(api, self.api.blob_post_only(REPO1, digest, td, require_digest=rd),
                              api)
        elif name == "post+put":
            api = "blob-post-put"
            ok = await o.step(api, self.api.blob_post_put(REPO1, digest, td, require_digest=rd),
                              api)
        elif name == "chunked single":
            api, found = "blob-patch-chunked", []
            ok = await o.step(api, self.api.blob_patch_chunked(
                REPO1, digest, td, require_digest=rd, min_header=found), api)
            if found and found[-1].isdigit() and int(found[-1]) > self.min_chunk[algo]:
                self.min_chunk[algo] = int(found[-1])
        elif name in CHUNKED_TESTS:
            api = "blob-patch-chunked"
            digest = digests[name] = td.gen_blob({"blob_size": size, "algo": algo})[0]
            ok = await o.step(api, self.api.blob_patch_chunked(
                REPO1, digest, td, require_digest=rd, put_last="put chunk" in name,
                out_of_order="out-of-order" in name), api)
        elif name == "stream":
            api = "blob-patch-stream"
            ok = await o.step(api, self.api.blob_patch_stream(REPO1, digest, td,
                                                              require_digest=rd), api)
        elif name == "post cancel":
            if not self.cfg.upload_cancel:  # APIRequire(stateAPIBlobCancel): disabled in 1.1
                ok = False
            else:
                ok = await o.step("blob-post-cancel", self.api.blob_post_cancel(REPO1))
        elif name == "mount":
            await self.push_blob_any(o, td, REPO2, digest)
            ok = await o.step("blob-mount", self.api.blob_mount(REPO1, REPO2, digest, td, rd))
        elif name == "mount anonymous":
            await self.push_blob_any(o, td, REPO2, digest)
            ok = await o.step("blob-mount-anonymous",
                              self.api.blob_mount(REPO1, "", digest, td, rd))
        elif name == "mount missing":
            async def missing():
                try:
                    await self.api.blob_mount(REPO1, REPO2, digest, td, rd)
                except Unsupported:
                    return  # a session instead of a mount, completed by PUT: as required
                raise Fail("blob mount of missing blob incorrectly succeeded")
            ok = await o.step("blob-mount", missing())
        else:
            raise AssertionError(name)
        if api:
            self.tested.add(api)
            self.tested_by_algo[algo].add(api)
        if ok and name != "post cancel":
            await self.head_blob(o, td, REPO1, digest)
            await self.pull_blob(o, td, REPO1, digest)
        await self.delete_blob(o, td, REPO1, digest)
        if name in ("mount", "mount anonymous"):
            await self.delete_blob(o, td, REPO2, digest)
        return o

    async def blob_ranges(self, algo: str) -> Outcome:
        td, _ = self.blob_set(algo)
        o = Outcome(self)
        n = 2048
        digest, body = td.gen_blob({"blob_size": n, "algo": algo})
        if not await self.push_blob_any(o, td, REPO1, digest):
            return o
        cases = {
            "range 500-1499": ("bytes=500-1499", body[500:1500], "500-1499"),
            "range 500-": ("bytes=500-", body[500:], f"500-{n - 1}"),
            "range -500": ("bytes=-500", body[n - 500:], f"{n - 500}-{n - 1}"),
            "range 2000-5000": ("bytes=2000-5000", body[2000:], f"2000-{n - 1}"),
            "range 500-0": ("bytes=500-0", None, None),
            "range 5000-10000": ("bytes=5000-10000", None, None),
        }
        for label, (header, part, span) in cases.items():
            async def run(header=header, part=part, span=span):
                r = await self.api.blob_get(REPO1, digest, headers=[("Range", header)])
                try:
                    if part is None:
                        want_status(r, 416)
                    else:
                        want_body(r, part)
                        want_status(r, 206)
                        want_header(r, "Content-Length", str(len(part)))
                        if f"bytes {span}/{n}" not in r.headers.getall("Content-Range", []):
                            want_header(r, "Content-Range", f"bytes {span}/*")
                except Fail as first:
                    try:  # the fallback a registry may answer with: the whole blob
                        want_status(r, 200)
                        want_header(r, "Content-Length", str(n))
                        want_body(r, body)
                    except Fail:
                        raise Fail(f"response did not match any condition: {first}") from None
                    raise Unsupported(f"range request unsupported, full blob returned\n    "
                                      f"{r.describe()}") from None
            await o.step(label, run())
        await self.delete_blob(o, td, REPO1, digest)
        return o

    async def blob_known(self, algo: str, name: str) -> Outcome:
        td, digests = self.blob_set(algo)
        o = Outcome(self)
        if name == "empty" and not self.cfg.empty_blob:
            return o
        value = b"" if name == "empty" else b"{}"
        digest = digests[name] = sha(value, algo)
        td.blobs[digest] = value
        await self.push_blob_any(o, td, REPO1, digest)
        await self.head_blob(o, td, REPO1, digest)
        await self.pull_blob(o, td, REPO1, digest)
        await self.delete_blob(o, td, REPO1, digest)
        return o

    async def blob_bad_digest(self, algo: str, name: str) -> Outcome:
        td, digests = self.blob_set(algo)
        o = Outcome(self)
        digest = td.gen_blob({"blob_size": self.min_chunk[algo] * 3 - 5, "algo": algo})[0]
        td.blobs[digest] += b"oh no"  # corrupt the bytes: they no longer match the digest
        digests[name] = digest
        rd = self.cfg.blob_digest_header
        call = {
            "bad digest post only": lambda: self.api.blob_post_only(
                REPO1, digest, td, require_digest=rd, bad=True),
            "bad digest post+put": lambda: self.api.blob_post_put(
                REPO1, digest, td, require_digest=rd, bad=True),
            "bad digest chunked": lambda: self.api.blob_patch_chunked(
                REPO1, digest, td, require_digest=rd, bad=True),
            # as run.go: the same call as "bad digest chunked" (no PutLastChunk flag)
            "bad digest chunked and put chunk": lambda: self.api.blob_patch_chunked(
                REPO1, digest, td, require_digest=rd, bad=True),
            "bad digest stream": lambda: self.api.blob_patch_stream(
                REPO1, digest, td, require_digest=rd, bad=True),
        }[name]
        await o.step(name, call())
        return o

    # -- the data sets: push, tag-list, head, pull, referrers, delete
    async def data_push(self, name: str) -> Outcome:
        td, o = self.data[name], Outcome(self)
        for digest in td.blobs:
            await self.push_blob_any(o, td, REPO1, digest)
        for i, digest in enumerate(td.man_order):
            flags = td.push_flags.get(digest, set())
            tags = [t for t, d in td.tags.items() if d == digest] if "TagParam" in flags else []

            async def put(digest=digest, flags=flags, tags=tags):
                r = await self.api.manifest_put(REPO1, digest, digest, td,
                                                referrers=self.cfg.referrer,
                                                bad="ExpectBadDigest" in flags, tag_params=tags)
                missing = []
                for tag in tags:
                    values = [v.strip() for h in r.headers.getall("OCI-Tag", [])
                              for v in h.split(",")]
                    if tag in values:
                        td.tag_pushed.add(tag)
                    else:
                        missing.append(tag)
                if missing:
                    raise Unsupported(f"header missing OCI-Tag: {missing}\n    {r.describe()}")
            await o.step(f"manifest-by-digest #{i} {digest[:19]}", put())
        for tag, digest in td.tags.items():
            if tag in td.tag_pushed:
                continue

            async def put_tag(tag=tag, digest=digest):
                await self.api.manifest_put(REPO1, tag, digest, td, referrers=self.cfg.referrer)
                td.tag_pushed.add(tag)
            await o.step(f"manifest-by-tag {tag}", put_tag())
        return o

    async def data_tag_list(self, name: str) -> Outcome:
        td, o = self.data[name], Outcome(self)

        async def run():
            tags = await self.api.tag_list(REPO1)
            errs = [f"missing tag {t!r} from listing {tags}" for t in td.tags if t not in tags]
            if len(tags) >= 2:
                ordered = sorted(tags)
                end = len(ordered) // 2
                last = ordered[end - 1]
                partial = await self.api.tag_list(REPO1, last=last)
                errs += [f"tag {t!r} returned when last set to {last!r}"
                         for t in ordered[:end] if t in partial]
                errs += [f"tag {t!r} missing when last set to {last!r}"
                         for t in ordered[end:] if t not in partial]
            if errs:
                raise Fail("; ".join(errs))
        await o.step("tag-list", run())
        return o

    async def data_head(self, name: str) -> Outcome:
        td, o = self.data[name], Outcome(self)
        rd = self.cfg.manifest_digest_header
        for tag, digest in td.tags.items():
            if "SkipPullTest" not in td.pull_flags.get(digest, ()):
                await o.step(f"manifest-head-by-tag {tag}", self.api.manifest_head_exists(
                    REPO1, tag, digest, td, rd))
        for i, digest in enumerate(td.man_order):
            if "SkipPullTest" not in td.pull_flags.get(digest, ()):
                await o.step(f"manifest-head-by-digest #{i}", self.api.manifest_head_exists(
                    REPO1, digest, digest, td, rd))
        for digest in td.blobs:
            await self.head_blob(o, td, REPO1, digest)
        return o

    async def data_pull(self, name: str) -> Outcome:
        td, o = self.data[name], Outcome(self)
        rd = self.cfg.manifest_digest_header
        for tag, digest in td.tags.items():
            if "SkipPullTest" not in td.pull_flags.get(digest, ()):
                await o.step(f"manifest-by-tag {tag}", self.api.manifest_get_exists(
                    REPO1, tag, digest, td, rd))
        for i, digest in enumerate(td.man_order):
            if "SkipPullTest" not in td.pull_flags.get(digest, ()):
                await o.step(f"manifest-by-digest #{i}", self.api.manifest_get_exists(
                    REPO1, digest, digest, td, rd))
        for digest in td.blobs:
            await self.pull_blob(o, td, REPO1, digest)
        return o

    async def data_referrers(self, name: str) -> Outcome:
        td, o = self.data[name], Outcome(self)

        def has(manifests: list[dict], goal: dict) -> bool:
            return any(m.get("digest") == goal["digest"]
                       and m.get("mediaType") == goal["mediaType"]
                       and m.get("size") == goal["size"]
                       and (m.get("artifactType") or "") == goal["artifactType"]
                       and all((m.get("annotations") or {}).get(k) == v
                               for k, v in goal["annotations"].items())
                       for m in manifests)

        async def run():
            errs, unsupported = [], []
            for subject, goals in td.referrers.items():
                try:
                    index, r = await self.api.referrers_list(REPO1, subject)
                    errs += [f"entry missing from referrers list, subject {subject}, referrer "
                             f"{g['digest']} ({g['artifactType']})\n    {r.describe()}"
                             for g in goals if not has(index.get("manifests") or [], g)]
                except Fail as e:
                    errs.append(str(e))
                for artifact_type in dict.fromkeys(g["artifactType"] for g in goals):
                    try:
                        index, r = await self.api.referrers_list(REPO1, subject, artifact_type)
                    except Fail as e:
                        errs.append(str(e))
                        continue
                    applied = "artifactType" in [f.strip() for f in r.headers.get(
                        "OCI-Filters-Applied", "").split(",")]
                    if not applied:
                        unsupported.append("registry does not set the expected "
                                           "OCI-Filters-Applied header for the artifactType\n"
                                           f"    {r.describe()}")
                    manifests = index.get("manifests") or []
                    errs += [f"entry missing from referrers list, subject {subject}, referrer "
                             f"{g['digest']}, filter {artifact_type}\n    {r.describe()}"
                             for g in goals if (not applied or g["artifactType"] == artifact_type)
                             and not has(manifests, g)]
                    if applied:
                        errs += [f"referrers filter for artifactType {artifact_type} included "
                                 f"descriptor {m}" for m in manifests
                                 if (m.get("artifactType") or "") != artifact_type]
            if errs:
                raise Fail("\n  ".join(errs))
            if unsupported:
                raise Unsupported("\n  ".join(unsupported))
        await o.step("referrers", run())
        return o

    async def data_delete(self, name: str, td: TestData | None = None) -> Outcome:
        td, o = td or self.data[name], Outcome(self)
        for tag, digest in td.tags.items():
            if tag not in td.tag_pushed:
                continue

            async def delete_tag(tag=tag, digest=digest):
                await self.api.manifest_delete(REPO1, tag)
                want_status(await self.api.manifest_head(REPO1, tag), 404)
            await o.step(f"tag-delete {tag}", delete_tag())
        for digest in reversed(td.man_order):
            async def delete_manifest(digest=digest):
                await self.api.manifest_delete(REPO1, digest)
                want_status(await self.api.manifest_head(REPO1, digest), 404)
            await o.step(f"manifest-delete {digest[:19]}", delete_manifest())
        for digest in td.blobs:
            await self.delete_blob(o, td, REPO1, digest)
        return o

    # -- TestManifestErrors
    async def missing_manifest_by_digest(self) -> Outcome:
        o = Outcome(self)

        async def run():
            want_status(await self.api.manifest_get(REPO1, sha(os.urandom(1024))), 404)
        await o.step("by-digest", run())
        return o

    async def missing_manifest_by_tag(self) -> Outcome:
        o = Outcome(self)

        async def run():
            tag = f"missing-{rand_text().lower()[:20]}"
            want_status(await self.api.manifest_get(REPO1, tag), 404)
        await o.step("by-tag", run())
        return o

    async def invalid_digest_format(self) -> Outcome:
        o = Outcome(self)
        td = TestData("Invalid Manifest Digest")
        digest = td.gen_manifest_full({"layer_count": 1})
        for blob in list(td.blobs):
            await self.push_blob_any(o, td, REPO1, blob)
        await o.step("manifest-put sha256:baddigeststring", self.api.manifest_put(
            REPO1, "sha256:baddigeststring", digest, td, referrers=self.cfg.referrer, bad=True))

        async def get():
            r = await self.api.manifest_get(REPO1, "sha256:baddigeststring")
            want_status(r, 404, 400)
        await o.step("manifest-get sha256:baddigeststring", get())
        cleanup = await self.data_delete("invalid-manifest-digest", td)
        o.fails += cleanup.fails
        o.skips += cleanup.skips
        return o


def v2_cases(cfg: V2Config) -> list[Case]:
    cases = [Case("ping", "GET /v2/", lambda r: r.ping()),
             Case("empty", "tag list", lambda r: r.empty_tag_list()),
             Case("empty", "referrers", lambda r: r.empty_referrers())]
    for algo in ("sha256", "sha512") if cfg.sha512 else ("sha256",):
        group = f"{algo} blobs"
        cases.append(Case(group, "get-missing", lambda r, a=algo: r.blob_get_missing(a)))
        for name in BLOB_API_TESTS + CHUNKED_TESTS:
            cases.append(Case(group, name, lambda r, a=algo, n=name: r.blob_api(a, n)))
        cases.append(Case(group, "range requests (" + ", ".join(RANGE_TESTS) + ")",
                          lambda r, a=algo: r.blob_ranges(a)))
        for name in ("empty", "emptyJSON"):
            cases.append(Case(group, name, lambda r, a=algo, n=name: r.blob_known(a, n)))
        for name in BAD_DIGEST_TESTS:
            cases.append(Case(group, name, lambda r, a=algo, n=name: r.blob_bad_digest(a, n)))
    with_referrers = {"artifacts-with-subject", "index-with-subject", "missing-subject"}
    for name in generate_data(cfg):
        cases.append(Case(name, "push", lambda r, n=name: r.data_push(n)))
        cases.append(Case(name, "tag-list", lambda r, n=name: r.data_tag_list(n)))
        cases.append(Case(name, "head", lambda r, n=name: r.data_head(n)))
        cases.append(Case(name, "pull", lambda r, n=name: r.data_pull(n)))
        if name in with_referrers:
            cases.append(Case(name, "referrers", lambda r, n=name: r.data_referrers(n)))
        cases.append(Case(name, "delete", lambda r, n=name: r.data_delete(n)))
    cases += [Case("missing-manifest", "by-digest", lambda r: r.missing_manifest_by_digest()),
              Case("missing-manifest", "by-tag", lambda r: r.missing_manifest_by_tag()),
              Case("invalid-digest-format", "put and get sha256:baddigeststring, cleanup",
                   lambda r: r.invalid_digest_format())]
    return cases


MAIN_CONFIG = V2Config()
MAIN_CASES = v2_cases(MAIN_CONFIG)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def main_suite(tmp_path_factory) -> V2:
    server, session, http = await start_registry(tmp_path_factory.mktemp("conformance-main"),
                                                 "Go-http-client/1.1")
    yield V2(http, MAIN_CONFIG)
    await session.close()
    await server.close()


@pytest.mark.parametrize("case", MAIN_CASES, ids=ids(MAIN_CASES))
async def test_main(main_suite: V2, case: Case):
    outcome = await case.fn(main_suite)
    outcome.finish()
