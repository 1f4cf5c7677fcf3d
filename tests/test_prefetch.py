"""`mirror prefetch` warms the cache through the mirror, so pulls work with the upstream gone."""

import asyncio
import os
import subprocess
import sys

import pytest

from mirror import config as cfg
from mirror.storage.sqlite import SqliteMetadata
from tests.commands import REPO, run, write_config
from tests.conftest import fetched, skopeo_copy


def blob_names(mirror) -> set[str]:
    return {p.name for p in mirror.blob_files()}


async def test_prefetched_image_pulls_with_the_upstream_down(mirror, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    result = await run(config, "prefetch", "alpine:3.19", "--mirror", mirror.url)
    assert result.code == 0, result.err
    size = sum(len(b) for b in alpine.blobs.values())
    assert (f"prefetched 1 of 1 image(s): 1 manifests, {len(alpine.blobs)} blobs"
            in result.out)
    assert f"({size} bytes), 0 failed" in result.out
    assert f"ok alpine:3.19 {alpine.digest}\nprefetched 1 of 1" in result.out  # output, in order
    assert result.err == ""  # no status line: not a terminal
    for digest in alpine.blobs:
        assert fetched(upstream, "GET", digest) == 1
    assert blob_names(mirror) == {d.partition(":")[2] for d in alpine.blobs}

    upstream.proxy.down()
    before = len(upstream.proxy.records)
    got = await skopeo_copy(f"{mirror.host}/alpine:3.19", tmp_path / "pull")
    assert got["manifest"] == alpine.manifest and got["digest"] == alpine.digest
    assert all(got["blobs"][d] == data for d, data in alpine.blobs.items())
    assert len(upstream.proxy.records) == before


async def test_prefetch_of_one_platform_fetches_only_its_manifest_and_blobs(
        mirror, upstream, tmp_path):
    index = upstream.images["library/multiarch"]
    arm64, amd64 = (next(c for c in index.children if c.platform["architecture"] == arch)
                    for arch in ("arm64", "amd64"))
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    result = await run(config, "prefetch", "multiarch:latest", "--platform", "linux/arm64",
                       "--mirror", mirror.url)
    assert result.code == 0, result.err
    size = sum(len(b) for b in arm64.blobs.values())
    assert f"2 manifests, {len(arm64.blobs)} blobs" in result.out
    assert f"({size} bytes)" in result.out
    assert fetched(upstream, "GET", arm64.digest) == 1
    assert fetched(upstream, "GET", amd64.digest) == 0
    for digest in arm64.blobs:
        assert fetched(upstream, "GET", digest) == 1
    for digest in amd64.blobs:
        assert fetched(upstream, "GET", digest) == 0
    assert blob_names(mirror) == {d.partition(":")[2] for d in arm64.blobs}

    upstream.proxy.down()
    got = await skopeo_copy(f"{mirror.host}/multiarch:latest", tmp_path / "arm", arch="arm64")
    assert got["manifest"] == arm64.manifest
    assert all(got["blobs"][d] == data for d, data in arm64.blobs.items())


async def test_pin_marks_the_image_in_the_ledger_and_keeps_its_blobs(mirror, upstream, tmp_path):
    app, alpine = upstream.images["team/app"], upstream.images["library/alpine"]
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    result = await run(config, "prefetch", "quay.io/team/app:2.0", "--pin", "--mirror", mirror.url)
    assert result.code == 0, result.err
    assert f"ok quay.io/team/app:2.0 {app.digest} (pinned)" in result.out
    result = await run(config, "prefetch", "alpine:3.19", "--mirror", mirror.url)
    assert result.code == 0, result.err

    usage = SqliteMetadata(mirror.root)
    try:
        item = await usage.item(app.digest)
        assert item is not None and item.pinned and item.size == len(app.manifest)
        assert await usage.pinned_closure() == {app.digest, *app.blobs}
        unpinned = await usage.item(alpine.digest)
        assert unpinned is None or not unpinned.pinned
    finally:
        await usage.close()


async def test_a_failed_image_is_named_with_the_mirrors_error_and_the_rest_is_cached(
        mirror, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    listing = tmp_path / "images.txt"
    listing.write_text("# warm-up list\nalpine:3.19\n\nalpine:nosuchtag  # gone\n")
    result = await run(config, "prefetch", "--file", str(listing), "--jobs", "2",
                       "--mirror", mirror.url)
    assert result.code == 1
    failure = next(line for line in result.out.splitlines() if "nosuchtag" in line)
    assert failure.startswith("failed alpine:nosuchtag: manifest nosuchtag: MANIFEST_UNKNOWN")
    assert "prefetched 1 of 2 image(s)" in result.out and "1 failed" in result.out
    assert blob_names(mirror) == {d.partition(":")[2] for d in alpine.blobs}


async def test_progress_is_one_redrawn_line_on_a_terminal(mirror, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    result = await run(config, "prefetch", "alpine:3.19", "--mirror", mirror.url, tty=True)
    assert result.code == 0, result.err
    redraws = result.err.split("\r\x1b[K")
    assert len(redraws) > 2  # status drawn, the image's line printed above it, cleared at exit
    assert any("images 1/1" in part and "[########################]" in part
               for part in redraws)
    assert f"ok alpine:3.19 {alpine.digest}\nprefetched 1 of 1 image(s)" in result.out
    assert "ok alpine" not in result.err


async def test_an_unreachable_mirror_fails_every_image(mirror, tmp_path):
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    result = await run(config, "prefetch", "alpine:3.19", "--mirror", "http://127.0.0.1:9")
    assert result.code == 1
    assert "failed alpine:3.19: manifest 3.19: cannot reach the mirror" in result.out
    assert "prefetched 0 of 1 image(s)" in result.out
    assert blob_names(mirror) == set()


async def test_pin_refuses_a_config_that_is_not_the_mirrors(mirror, tmp_path):
    elsewhere = cfg.Config(storage=cfg.Storage(root=str(tmp_path / "elsewhere")),
                           upstreams=mirror.config.upstreams)
    config = write_config(tmp_path / "other.toml", elsewhere)
    result = await run(config, "prefetch", "alpine:3.19", "--pin", "--mirror", mirror.url)
    assert result.code == 1
    assert "--pin: " + str(tmp_path / "elsewhere") + " holds no mirror's ledger" in result.err
    assert not (tmp_path / "elsewhere").exists() and mirror.blob_files() == []


def prefetch_through_a_pipe(config, *args: str, merged: bool) -> tuple[int, list[str]]:
    """`mirror prefetch ARGS | cat` (with `2>&1` when `merged`): the lines the pipe carries,
    in the order it carried them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    proc = subprocess.run(
        [sys.executable, "-m", "mirror", "--config", str(config), "prefetch", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.DEVNULL, timeout=120)
    return proc.returncode, proc.stdout.decode().splitlines()


@pytest.mark.parametrize("merged", [False, True], ids=["stdout", "stdout-and-stderr"])
async def test_piped_output_has_the_image_lines_first_and_the_summary_last(
        mirror, upstream, tmp_path, merged):
    alpine = upstream.images["library/alpine"]
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    code, lines = await asyncio.to_thread(
        prefetch_through_a_pipe, config, "alpine:3.19", "alpine:nosuchtag", "--mirror",
        mirror.url, merged=merged)
    assert code == 1
    assert len(lines) == 3, lines
    assert f"ok alpine:3.19 {alpine.digest}" in lines[:2]
    assert any(line.startswith("failed alpine:nosuchtag: manifest nosuchtag: ")
               for line in lines[:2])
    assert lines[2].startswith("prefetched 1 of 2 image(s): ") and " 1 failed, in " in lines[2]
