"""The cache view (`/cache`, `/cache.json`, `/cache/<name>`): after real pulls through the
mirror and a real push, it lists every repository with its exact tags, digests and sizes,
equal to what `mirror ls --json` prints; search by substring; pages that are disjoint and
together list everything; the HTML as headless Chromium renders it; the status read rule.
Then the metadata calls it pages with, on SQLite and on Redis alike."""

from __future__ import annotations

import hashlib
import json
import time
from html import escape

import pytest

from mirror import config as cfg
from mirror.api.browse import Parts
from mirror.ops.inventory import Cursor, Inventory
from mirror.ops.local import human_size
from mirror.storage.blobs import BlobStore
from mirror.storage.index import Index
from mirror.storage.memory import Memory
from mirror.storage.metadata import ManifestPush, Metadata, TagRecord
from mirror.storage.redis_metadata import RedisMetadata
from mirror.storage.sqlite import SqliteMetadata
from mirror.trust.rules import Rules
from tests.commands import run, write_config
from tests.support import chromium
from tests.support.images import OCI_MANIFEST, small_image
from tests.support.process import get_manifest, pull, push
from tests.test_access_logins import basic, cheap_bcrypt, write_htpasswd
from tests.test_inventory import stored_size


async def fetch(http, url: str, **headers) -> tuple[int, str, bytes]:
    async with http.get(url, headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


async def listing(http, url: str) -> dict:
    status, content_type, body = await fetch(http, url)
    assert (status, content_type) == (200, "application/json"), body[:300]
    return json.loads(body)


async def traffic(mirror, upstream, http):
    """Pull alpine, the arm64 half of multiarch and quay's team/app through the mirror, and
    push a hosted image: (alpine, index, arm64, app, tool) as the test upstream holds them."""
    alpine, index, app = (upstream.images[n] for n in
                          ("library/alpine", "library/multiarch", "team/app"))
    arm64 = next(c for c in index.children if c.platform["architecture"] == "arm64")
    pulled = await pull(http, mirror.url, "alpine", "3.19")
    assert pulled.digest == alpine.digest and pulled.blobs == alpine.blobs
    digest, _, body = await get_manifest(http, mirror.url, "library/multiarch", "latest")
    assert (digest, body) == (index.digest, index.manifest)
    assert (await pull(http, mirror.url, "library/multiarch", arm64.digest)).blobs == arm64.blobs
    assert (await pull(http, f"{mirror.url}/quay", "team/app", "2.0")).digest == app.digest
    tool = small_image("myteam/tool", ["1", "stable"], "cache-view", size=2048)
    await push(http, mirror.url, tool)
    await mirror.proxy.index.metadata.flush()  # the hits' clocks, as `ls` reads them
    return alpine, index, arm64, app, tool


async def test_the_json_twin_lists_each_repository_as_ls_does(mirror, upstream, http, tmp_path):
    started = time.time()
    alpine, index, arm64, app, tool = await traffic(mirror, upstream, http)

    document = await listing(http, f"{mirror.url}/cache.json")
    assert document["next"] is None
    found = {r["name"]: r for r in document["repositories"]}
    assert list(found) == ["library/alpine", "library/multiarch", "myteam/tool",
                           "quay.io/team/app"]
    assert {n: (r["kind"], r["key"]) for n, r in found.items()} == {
        "library/alpine": ("cached", "docker.io/library/alpine"),
        "library/multiarch": ("cached", "docker.io/library/multiarch"),
        "myteam/tool": ("hosted", None), "quay.io/team/app": ("cached", "quay.io/team/app")}
    assert found["library/alpine"]["tags"] == {"3.19": {"index": alpine.digest}}
    assert found["library/multiarch"]["tags"] == {"latest": {"index": index.digest}}
    assert found["quay.io/team/app"]["tags"] == {"2.0": {"index": app.digest}}
    assert found["myteam/tool"]["tags"] == {"1": {"any": tool.digest},
                                            "stable": {"any": tool.digest}}
    # Sizes are the bytes that went through: only the arm64 half of the index is stored.
    sizes = {"library/alpine": stored_size(alpine), "myteam/tool": stored_size(tool),
             "library/multiarch": len(index.manifest) + stored_size(arm64),
             "quay.io/team/app": stored_size(app)}
    assert {n: r["size"] for n, r in found.items()} == sizes
    assert found["library/multiarch"]["manifests"] == {index.digest: {
        "media_type": index.media_type, "size": sizes["library/multiarch"],
        "platforms": [{"platform": f"linux/{c.platform['architecture']}", "digest": c.digest,
                       "stored": c is arm64} for c in index.children], "pinned": False}}
    assert found["myteam/tool"]["manifests"] == {tool.digest: {
        "media_type": tool.media_type, "size": stored_size(tool), "platforms": [],
        "pinned": False}}
    for repository in found.values():
        assert started - 1 <= repository["last_used"] <= time.time()
        assert repository["verdict"]["repository"] == "allowed"

    config = write_config(tmp_path / "mirror.toml", mirror.config)
    result = await run(config, "ls", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["repositories"] == document["repositories"]

    status, _, body = await fetch(http, f"{mirror.url}/cache.json?name=myteam/tool")
    assert status == 200 and json.loads(body)["repositories"] == [found["myteam/tool"]]
    status, _, body = await fetch(http, f"{mirror.url}/cache.json?name=library/nothing")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"


async def test_search_finds_one_repository_by_a_substring(mirror, upstream, http):
    await traffic(mirror, upstream, http)
    found = await listing(http, f"{mirror.url}/cache.json?q=ltiar")
    assert [r["name"] for r in found["repositories"]] == ["library/multiarch"]
    found = await listing(http, f"{mirror.url}/cache.json?q=TEAM")  # names are lower case
    assert [r["name"] for r in found["repositories"]] == ["myteam/tool", "quay.io/team/app"]
    found = await listing(http, f"{mirror.url}/cache.json?from=hosted")
    assert [r["name"] for r in found["repositories"]] == ["myteam/tool"]
    found = await listing(http, f"{mirror.url}/cache.json?from=docker.io&q=a")
    assert [r["name"] for r in found["repositories"]] == ["library/alpine", "library/multiarch"]
    status, _, body = await fetch(http, f"{mirror.url}/cache?from=quay.io")
    assert status == 200 and "quay.io/team/app</a>" in body.decode()
    assert "library/alpine</a>" not in body.decode() and "<b>quay.io</b>" in body.decode()
    status, _, body = await fetch(http, f"{mirror.url}/cache.json?from=elsewhere.example")
    assert status == 400 and b"from must be one of docker.io, quay.io, hosted" in body
    # A default-upstream name is matched as clients pull it, not by its `docker.io/` key.
    assert (await listing(http, f"{mirror.url}/cache.json?q=docker.io"))["repositories"] == []
    status, _, body = await fetch(http, f"{mirror.url}/cache?q=%3Cscript%3Ealert(1)")
    text = body.decode()
    assert status == 200 and "<script>" not in text and escape("<script>alert(1)") in text
    assert "Nothing matches." in text


async def test_pages_are_disjoint_and_together_list_all(mirror, upstream, http):
    await traffic(mirror, upstream, http)
    everything = [r["name"] for r in (await listing(http, f"{mirror.url}/cache.json"))[
        "repositories"]]
    for n in (1, 2, 3):
        pages, url = [], f"{mirror.url}/cache.json?n={n}"
        while url:
            document = await listing(http, url)
            pages.append([r["name"] for r in document["repositories"]])
            url = document["next"] and mirror.url + document["next"]
        assert [len(p) for p in pages] == [len(p) for p in _chunks(everything, n)]
        assert sum(pages, []) == everything  # disjoint, in order, nothing left out
    status, _, body = await fetch(http, f"{mirror.url}/cache?n=2")
    assert status == 200 and 'rel="next" href="/cache?last=library%2Fmultiarch&amp;kind=cached' \
        '&amp;n=2"' in body.decode()
    status, _, body = await fetch(http, f"{mirror.url}/cache.json?kind=sideways")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


async def test_chromium_shows_the_images_with_their_sizes_and_finds_one(
        mirror, upstream, http, tmp_path):
    alpine, index, arm64, app, tool = await traffic(mirror, upstream, http)
    dom = await chromium.dump_dom(f"{mirror.url}/cache", tmp_path)
    rows = {name: _row(dom, name) for name in ("library/alpine", "library/multiarch",
                                               "quay.io/team/app", "myteam/tool")}
    assert human_size(stored_size(alpine)) in rows["library/alpine"]
    assert human_size(len(index.manifest) + stored_size(arm64)) in rows["library/multiarch"]
    assert human_size(stored_size(app)) in rows["quay.io/team/app"]
    assert human_size(stored_size(tool)) in rows["myteam/tool"]
    assert "<code>3.19</code>" in rows["library/alpine"]
    assert "<code>1</code> <code>stable</code>" in rows["myteam/tool"]
    # The arm64 half is stored, the amd64 half is not (struck through).
    assert 'linux/amd64</s>, linux/arm64' in rows["library/multiarch"]

    dom = await chromium.dump_dom(f"{mirror.url}/cache?q=multi", tmp_path)
    assert "library/multiarch" in dom and "library/alpine" not in dom
    assert 'value="multi"' in dom

    dom = await chromium.dump_dom(f"{mirror.url}/cache/library/multiarch", tmp_path)
    assert f'title="{index.digest}"' in dom and index.media_type in dom


def _row(dom: str, name: str) -> str:
    """The listing's table row of repository `name`."""
    start = dom.index(f'<a href="/cache/{name}">{name}</a>')
    return dom[start:dom.index("</tr>", start)]


async def test_the_view_is_behind_the_read_rule_with_logins(start_mirror, upstream, http,
                                                            tmp_path):
    path = write_htpasswd(tmp_path / "htpasswd", alice=cheap_bcrypt(b"wonder"))
    mirror = await start_mirror(access=cfg.Access(htpasswd=path, anonymous_pull=False))
    for page in ("/cache", "/cache.json", "/cache/library/alpine"):
        status, _, body = await fetch(http, mirror.url + page)
        assert status == 401 and b"UNAUTHORIZED" in body, page
    status, _, body = await fetch(http, f"{mirror.url}/cache.json",
                                  Authorization=basic("alice", "wonder"))
    assert status == 200 and json.loads(body) == {"repositories": [], "next": None}


# The metadata calls a page is read with, and the merge of their answers.

@pytest.fixture(params=["sqlite", "redis"])
async def metadata(request, tmp_path):
    if request.param == "sqlite":
        store: Metadata = SqliteMetadata(tmp_path)
    else:
        url, prefix = request.getfixturevalue("redis_url_prefix")
        store = await RedisMetadata.connect(url, prefix)
    yield store
    await store.close()


def d(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


UPSTREAMS = (cfg.Upstream("docker.io", "http://127.0.0.1:9", default=True),
             cfg.Upstream("quay.io", "http://127.0.0.1:9"),
             cfg.Upstream("ghcr.io", "http://127.0.0.1:9"))
# (name, kind) in the order every page lists them, whatever the page size.
LISTED = [("ghcr.io/org/tool", "cached"), ("library/a", "cached"), ("library/a", "hosted"),
          ("library/b", "cached"), ("library/c", "cached"), ("myteam/tool", "hosted"),
          ("old.example/x/y", "cached"), ("quay.io/team/app", "cached"),
          ("zeta/x", "cached"), ("zzz/last", "hosted")]


async def fill(metadata: Metadata) -> None:
    keys = ["docker.io/library/a", "docker.io/library/b", "docker.io/zeta/x",
            "quay.io/team/app", "ghcr.io/org/tool",
            "old.example/x/y"]  # an upstream no longer configured: listed by its key
    for key in keys:
        for tag in ("v1", "v2"):
            await metadata.put_tag(key, tag, "index", TagRecord(d(key + tag), OCI_MANIFEST,
                                                                 10, time.time()))
    # Pulled by digest only (library/c); a catalog older than `library/` (a); an upstream
    # no longer configured, whose name no rule can route (gone.example).
    for name in ("library/a", "library/c", "a", "quay.io/team/app", "gone.example/z"):
        await metadata.add_repository(name)
    for name in ("library/a", "myteam/tool", "zzz/last"):
        body = json.dumps({"schemaVersion": 2, "name": name}).encode()
        await metadata.push_manifest(ManifestPush(name, d(name), OCI_MANIFEST, body, [], {},
                                                  ["1"]), lambda digest: None)


async def test_pages_of_every_size_list_each_repository_once_in_order(metadata, tmp_path):
    await fill(metadata)
    config = cfg.Config(storage=cfg.Storage(root=str(tmp_path)), upstreams=UPSTREAMS)
    parts = Parts(metadata, Index(metadata, Memory()), BlobStore(tmp_path, metadata))
    inventory = Inventory(config, parts, Rules(config))
    everything = await inventory.everything()
    assert [(r.name, r.kind) for r in everything] == LISTED
    assert {r.name: r.key for r in everything if r.kind == "cached"}["library/b"] == \
        "docker.io/library/b"
    for n in range(1, len(LISTED) + 1):
        pages, cursor = [], Cursor()
        while cursor is not None:
            page = await inventory.page(cursor, n)
            pages.append([(r.name, r.kind) for r in page.repositories])
            cursor = page.next
        assert sum(pages, []) == LISTED, n
        assert all(len(p) == n for p in pages[:-1]) and 1 <= len(pages[-1]) <= n
    found = await inventory.page(contains="team")
    assert [(r.name, r.kind) for r in found.repositories] == [("myteam/tool", "hosted"),
                                                               ("quay.io/team/app", "cached")]
    found = await inventory.page(contains="io/")  # docker.io's names as clients pull them
    assert [r.name for r in found.repositories] == ["ghcr.io/org/tool", "quay.io/team/app"]
    assert [(r.name, r.kind) for r in await inventory.named("library/a")] == LISTED[1:3]
    # By source: each upstream's (the default's with tags: its catalog has no prefix to be
    # read by), and the hosted ones; every page size gives the same.
    expected = {"docker.io": ["library/a", "library/b", "zeta/x"],
                "quay.io": ["quay.io/team/app"], "ghcr.io": ["ghcr.io/org/tool"],
                "hosted": ["library/a", "myteam/tool", "zzz/last"]}
    for source, names in expected.items():
        for n in (1, 2, 5):
            listed, cursor = [], Cursor()
            while cursor is not None:
                page = await inventory.page(cursor, n, source=source)
                listed += [(r.name, r.kind) for r in page.repositories]
                cursor = page.next
            kind = "hosted" if source == "hosted" else "cached"
            assert listed == [(name, kind) for name in names], (source, n)
    for contains in ("io/te", "quay", "app"):  # a search may span the upstream's prefix
        found = await inventory.page(contains=contains, source="quay.io")
        assert [r.name for r in found.repositories] == ["quay.io/team/app"], contains
    assert (await inventory.page(contains="tool", source="quay.io")).repositories == []


async def test_the_paging_calls_answer_alike_on_every_backend(metadata):
    await fill(metadata)
    assert await metadata.catalog_page("", 3) == ["a", "gone.example/z", "library/a"]
    assert await metadata.catalog_page("library/a", 10, "a") == ["library/c",
                                                                 "quay.io/team/app"]
    assert await metadata.hosted_page("library/a", 10) == ["myteam/tool", "zzz/last"]
    assert await metadata.tagged_page("docker.io/", "", 10) == ["library/a", "library/b",
                                                                "zeta/x"]
    assert await metadata.tagged_page("docker.io/", "library/a", 1, "b") == ["library/b"]
    assert await metadata.tagged_page("", "", 10, exclude="docker.io/") == [
        "ghcr.io/org/tool", "old.example/x/y", "quay.io/team/app"]
    assert await metadata.tagged_page("", "ghcr.io/org/tool", 1, exclude="docker.io/") == \
        ["old.example/x/y"]
    tags = await metadata.repository_tags(["quay.io/team/app", "docker.io/none"])
    assert {key: [(t, c, r.digest) for t, c, r in found] for key, found in tags.items()} == {
        "quay.io/team/app": [("v1", "index", d("quay.io/team/appv1")),
                             ("v2", "index", d("quay.io/team/appv2"))],
        "docker.io/none": []}
    layer = d("layer")
    metadata.record_blob(layer, 42, atime=100.0)
    await metadata.flush()
    body = json.dumps({"layers": [{"digest": layer}]}).encode()
    await metadata.put_manifest(d("m"), OCI_MANIFEST, body, [layer])
    entries = await metadata.ledger_entries([d("m"), layer, d("absent")])
    assert {k: (i.kind, i.size, c) for k, (i, c) in entries.items()} == {
        d("m"): ("manifest", len(body), [layer]), layer: ("blob", 42, [])}
    assert await metadata.manifests_of([d("m"), d("absent")]) == {d("m"): (OCI_MANIFEST, body)}
