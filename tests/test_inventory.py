"""`mirror ls` and `mirror du`: repositories, tags, sizes and last use, as stored."""

import asyncio
import json
import time

from mirror.ops.local import human_size
from tests.commands import run, write_config
from tests.conftest import skopeo_copy


def stored_size(*images) -> int:
    """Manifests plus every distinct blob: what these images take on disk."""
    blobs = {d: b for image in images for d, b in image.blobs.items()}
    return sum(len(i.manifest) for i in images) + sum(len(b) for b in blobs.values())


async def push(source_dir, destination: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "skopeo", "copy", "--dest-tls-verify=false", f"dir:{source_dir}",
        f"docker://{destination}", stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


async def test_ls_and_du_report_what_is_stored(mirror, upstream, tmp_path):
    alpine, index, app = (upstream.images[n] for n in
                          ("library/alpine", "library/multiarch", "team/app"))
    arm64 = next(c for c in index.children if c.platform["architecture"] == "arm64")
    config = write_config(tmp_path / "mirror.toml", mirror.config, max_size="1GiB")
    started = time.time()
    for args in (["alpine:3.19"], ["multiarch:latest", "--platform", "linux/arm64"],
                 ["quay.io/team/app:2.0", "--pin"]):
        result = await run(config, "prefetch", *args, "--mirror", mirror.url)
        assert result.code == 0, result.err
    # A hosted repository holding the very same image: shared storage, counted once in use.
    await skopeo_copy(f"{mirror.host}/alpine:3.19", tmp_path / "alpine")
    await push(tmp_path / "alpine", f"{mirror.host}/myteam/tool:1")

    result = await run(config, "ls", "--json")
    assert result.code == 0, result.err
    found = {r["name"]: r for r in json.loads(result.out)["repositories"]}
    assert set(found) == {"library/alpine", "library/multiarch", "quay.io/team/app",
                          "myteam/tool"}
    assert found["library/alpine"]["kind"] == "cached"
    assert found["library/alpine"]["key"] == "docker.io/library/alpine"
    assert found["library/alpine"]["tags"] == {"3.19": {"index": alpine.digest}}
    assert found["library/alpine"]["size"] == stored_size(alpine)
    # Only what is stored counts: the index and its arm64 half, not the amd64 one.
    assert found["library/multiarch"]["size"] == \
        len(index.manifest) + stored_size(arm64)
    assert found["quay.io/team/app"]["size"] == stored_size(app)
    # The index's platforms, each saying whether it is stored; the pinned image's pin.
    assert found["library/multiarch"]["manifests"] == {index.digest: {
        "media_type": index.media_type, "size": len(index.manifest) + stored_size(arm64),
        "platforms": [{"platform": f"linux/{c.platform['architecture']}", "digest": c.digest,
                       "stored": c is arm64} for c in index.children], "pinned": False}}
    assert found["library/multiarch"]["pins"] == []
    assert found["quay.io/team/app"]["pins"] == [app.digest]
    assert found["quay.io/team/app"]["manifests"][app.digest]["pinned"] is True
    assert found["myteam/tool"] == {
        "name": "myteam/tool", "kind": "hosted", "key": None,
        "tags": {"1": {"any": alpine.digest}}, "size": stored_size(alpine),
        "verdict": {"repository": "allowed", "tags": {"1": "allowed"}},
        "signatures": {"1": {"digest": alpine.digest, "verdict": "not required", "rules": []}},
        "manifests": {alpine.digest: {"media_type": alpine.media_type,
                                      "size": stored_size(alpine), "platforms": [],
                                      "pinned": False}},
        "pins": [], "last_used": found["myteam/tool"]["last_used"]}
    for repository in found.values():
        assert started - 1 <= repository["last_used"] <= time.time()

    result = await run(config, "du", "--json")
    assert result.code == 0, result.err
    usage = json.loads(result.out)
    cached = stored_size(alpine) + len(index.manifest) + stored_size(arm64) + stored_size(app)
    assert usage["cached_bytes"] == cached
    assert usage["hosted_bytes"] == stored_size(alpine)
    assert usage["used_bytes"] == cached  # the hosted image is the cached one
    assert usage["budget_bytes"] == 1 << 30
    assert usage["use_ratio"] == cached / (1 << 30)
    assert usage["repositories"] == 4
    assert {r["name"] for r in usage["top"][:2]} == {"library/alpine", "myteam/tool"}
    assert [r["size"] for r in usage["top"]] == sorted((r["size"] for r in usage["top"]),
                                                       reverse=True)


async def test_the_human_tables_show_names_sizes_and_budget(mirror, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    result = await run(config, "prefetch", "alpine:3.19", "--mirror", mirror.url)
    assert result.code == 0, result.err

    result = await run(config, "ls")
    header, row = result.out.splitlines()
    assert header.split() == ["REPOSITORY", "KIND", "SIZE", "LAST", "USE", "VERDICT", "TAGS",
                              "SIGNATURES"]
    assert row.startswith("library/alpine  cached  " + human_size(stored_size(alpine)))
    # No [[policy.signatures]]: nothing to require of any tag.
    assert row.endswith("  3.19  not required")
    assert time.strftime("%Y-%m-%d") in row

    result = await run(config, "du")
    lines = result.out.splitlines()
    assert lines[0] == f"cached  {human_size(stored_size(alpine))}"
    assert lines[1] == "hosted  0 B"
    assert lines[2] == f"used    {human_size(stored_size(alpine))} " \
        "(no budget: storage.max_size is not set)"
    assert lines[3:] == ["largest repositories:",
                         f"  library/alpine  cached  {human_size(stored_size(alpine))}"]


async def test_an_empty_cache_lists_nothing(mirror, tmp_path):
    config = write_config(tmp_path / "mirror.toml", mirror.config, max_size="10MB")
    assert json.loads((await run(config, "ls", "--json")).out) == {"repositories": []}
    usage = json.loads((await run(config, "du", "--json")).out)
    assert usage == {"cached_bytes": 0, "hosted_bytes": 0, "used_bytes": 0,
                     "budget_bytes": 10_000_000, "use_ratio": 0.0, "repositories": 0,
                     "top": []}
