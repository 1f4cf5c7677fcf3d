"""A cache filled by bench/synthetic.py is one the mirror serves like its own: the content is
valid, a start keeps the ledger rows of blobs whose files are absent (it compares no row
with the disk), and `tags/list` and `_catalog` pages are whole, ordered and linked while
reading only a page."""

import hashlib
import json
import sqlite3
import sys
from pathlib import Path

import pytest

from mirror import config as cfg
from mirror.app import make_app
from mirror.keys import PROXY
from mirror.media import references
from mirror.storage.sqlite import SqliteMetadata

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import synthetic  # noqa: E402

OCI = f"{synthetic.OCI_MANIFEST}, {synthetic.OCI_INDEX}"


@pytest.fixture
def filled(tmp_path):
    return synthetic.fill(tmp_path / "root", items=3000, manifests=400, repositories=60,
                          tags_in_one=250, hosted_images=5, blob_files=10)


@pytest.fixture
async def served(filled, aiohttp_server):
    """The filled root behind an offline mirror (no upstream is ever asked)."""
    config = cfg.Config(
        server=cfg.Server(listen="127.0.0.1:0", offline=True),
        storage=cfg.Storage(root=str(filled.root)),
        upstreams=tuple(cfg.Upstream(name, "http://127.0.0.1:9", default=name == "docker.io",
                                     tag_ttl=1e9) for name in synthetic.UPSTREAMS))
    server = await aiohttp_server(make_app(config))
    return filled, server, f"http://127.0.0.1:{server.port}"


def rows(root: Path, sql: str, *args) -> list:
    with sqlite3.connect(root / "metadata.sqlite") as db:
        return db.execute(sql, args).fetchall()


def test_synthetic_manifests_parse_and_the_ledger_holds_what_they_refer_to(filled):
    manifests = rows(filled.root, "SELECT digest, media_type, body FROM manifests")
    assert len(manifests) == filled.manifests == 400
    children = {}
    for parent, child in rows(filled.root, "SELECT parent, child FROM refs"):
        children.setdefault(parent, set()).add(child)
    items = {d: kind for d, kind in rows(filled.root, "SELECT digest, kind FROM items")}
    assert len(items) == filled.items == 3000
    for digest, media_type, body in manifests:
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
        assert json.loads(body)["mediaType"] == media_type
        assert set(references(body)) == children[digest]  # the mirror's own parser agrees
        assert items[digest] == "manifest" and all(c in items for c in children[digest])
    assert rows(filled.root, "SELECT sum(size) FROM items")[0][0] == filled.total_bytes
    tags = rows(filled.root, "SELECT tag FROM tags WHERE repository = ? ORDER BY tag",
                "docker.io/" + filled.big)
    assert [t for (t,) in tags] == filled.big_tags and len(filled.big_tags) >= 250


async def test_a_start_keeps_the_rows_of_absent_files_and_serves_what_is_there(served, http):
    filled, server, url = served
    metadata = server.app[PROXY].index.metadata
    assert metadata.total() == filled.total_bytes  # read back, not summed and not reconciled
    assert len(await metadata.items()) == filled.items
    async with http.get(f"{url}/v2/{filled.name}/manifests/{filled.tag}",
                        headers={"Accept": OCI}) as resp:
        body = await resp.read()
        assert resp.status == 200 and resp.headers["Docker-Content-Digest"] == filled.digest
        assert "sha256:" + hashlib.sha256(body).hexdigest() == filled.digest
    config = json.loads(body)["config"]["digest"]  # one of the blob files that exist
    async with http.get(f"{url}/v2/{filled.name}/blobs/{config}") as resp:
        data = await resp.read()
        assert resp.status == 200 and hashlib.sha256(data).hexdigest() == config[7:]
    layer = json.loads(body)["layers"][-1]["digest"]  # in the ledger, no file: a miss
    async with http.get(f"{url}/v2/{filled.name}/blobs/{layer}") as resp:
        assert resp.status == 503 and (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"
    assert (await metadata.item(layer)).size == json.loads(body)["layers"][-1]["size"]


async def pages(http, url: str, key: str, n: int) -> tuple[list[str], int]:
    """Every page of a paginated list, following Link; (the names, the number of pages)."""
    found, count, path = [], 0, f"{url}?n={n}"
    while path is not None:
        async with http.get(path) as resp:
            assert resp.status == 200
            page = (await resp.json())[key]
            link = resp.headers.get("Link")
        assert len(page) <= n and page == sorted(page)
        found += page
        count += 1
        path = None if link is None else url.split("/v2/")[0] + link.split(">")[0][1:]
    return found, count


async def test_tags_list_pages_of_a_repository_with_many_tags(served, http):
    filled, server, url = served
    for name in (filled.big, filled.hosted_big):
        expected = filled.big_tags if name == filled.big else sorted(
            t for (t,) in rows(filled.root, "SELECT tag FROM hosted_tags WHERE name = ?", name))
        found, count = await pages(http, f"{url}/v2/{name}/tags/list", "tags", 40)
        assert found == expected and count == -(-len(expected) // 40)
        last = expected[200]
        async with http.get(f"{url}/v2/{name}/tags/list?n=5&last={last}") as resp:
            assert (await resp.json())["tags"] == expected[201:206]
            assert resp.headers["Link"] == \
                f'</v2/{name}/tags/list?n=5&last={expected[205]}>; rel="next"'
        async with http.get(f"{url}/v2/{name}/tags/list?n=0") as resp:
            assert (await resp.json())["tags"] == [] and "Link" not in resp.headers


async def test_catalog_pages_merge_cached_and_hosted_names(served, http):
    filled, server, url = served
    cached = [n for (n,) in rows(filled.root, "SELECT name FROM catalog")]
    expected = sorted(set(cached) | {filled.hosted, filled.hosted_big})
    async with http.get(f"{url}/v2/_catalog") as resp:
        assert (await resp.json())["repositories"] == expected
    found, count = await pages(http, f"{url}/v2/_catalog", "repositories", 7)
    assert found == expected and count == -(-len(expected) // 7)
    # A page that ends just before a hosted name, and one that starts with it.
    at = expected.index(filled.hosted)
    async with http.get(f"{url}/v2/_catalog?n=2&last={expected[at - 2]}") as resp:
        assert (await resp.json())["repositories"] == expected[at - 1:at + 1]


async def test_a_later_page_reads_only_a_page(served, http):
    filled, server, url = served
    metadata = server.app[PROXY].index.metadata
    statements: list[str] = []
    await metadata._run(metadata._db.set_trace_callback, statements.append)
    try:
        async with http.get(f"{url}/v2/_catalog?n=3&last=library/r3") as resp:
            assert resp.status == 200
        last = filled.big_tags[100]
        for _ in range(2):
            async with http.get(f"{url}/v2/{filled.big}/tags/list?n=3&last={last}") as resp:
                assert (await resp.json())["tags"] == filled.big_tags[101:104]
        hosted = sorted(t for (t,) in rows(filled.root, "SELECT tag FROM hosted_tags WHERE "
                                           "name = ?", filled.hosted_big))
        async with http.get(f"{url}/v2/{filled.hosted_big}/tags/list?n=3&last={hosted[100]}"
                            ) as resp:
            assert (await resp.json())["tags"] == hosted[101:104]
    finally:
        await metadata._run(metadata._db.set_trace_callback, None)
    catalog = [s for s in statements if "FROM catalog" in s]
    assert len(catalog) == 1 and "LIMIT" in catalog[0], catalog  # a page, not every name
    # The tag list is read once and then held parsed (30 s): the second page reads nothing.
    assert len([s for s in statements if "FROM tag_lists" in s]) == 1, statements
    # A hosted repository's page is one ordered, limited read of its tags, not all of them.
    hosted_reads = [s for s in statements if "FROM hosted_tags" in s]
    assert len(hosted_reads) == 1 and "LIMIT 4" in hosted_reads[0], hosted_reads


async def test_the_ledger_total_is_stored_with_each_change_and_read_back(tmp_path):
    first, second = SqliteMetadata(tmp_path), SqliteMetadata(tmp_path)
    try:
        first.record_blob("sha256:" + "a" * 64, 100)
        first.record_blob("sha256:" + "b" * 64, 20)
        await first.put_manifest("sha256:" + "c" * 64, synthetic.OCI_MANIFEST, b"{}", [])
        await first.forget("sha256:" + "b" * 64)
        assert first.total() == 102
        statements: list[str] = []
        await second._run(second._db.set_trace_callback, statements.append)
        assert await second.refresh_total() == 102  # another process's writes, seen
        assert not [s for s in statements if "sum(" in s]  # one row read, no sum of sizes
    finally:
        await first.close()
        await second.close()
    assert rows(tmp_path, "SELECT value FROM meta WHERE key = 'ledger_total'") == [("102",)]
    again = SqliteMetadata(tmp_path)
    try:
        assert again.total() == 102
    finally:
        await again.close()
