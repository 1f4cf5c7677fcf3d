"""Air gap: export cached images as an OCI layout tar, import it into a mirror with no upstream."""

import asyncio
import io
import json
import tarfile

from mirror import config as cfg
from mirror.media import DOCKER_MANIFEST
from mirror.storage.sqlite import SqliteMetadata
from tests.commands import run, write_config
from tests.conftest import sha256, skopeo_copy

DEAD = "http://127.0.0.1:9"  # nothing listens there: any upstream request would fail
IMAGES = ("alpine:3.19", "multiarch:latest", "quay.io/team/app:2.0")


async def exported_bundle(start_mirror, tmp_path, *images: str):
    """Prefetch `images` into a fresh mirror and export them; (bundle path, that mirror)."""
    source = await start_mirror(root=tmp_path / "source")
    config = write_config(tmp_path / "source.toml", source.config)
    result = await run(config, "prefetch", *images, "--mirror", source.url)
    assert result.code == 0, result.err
    bundle = tmp_path / "bundle.tar"
    result = await run(config, "export", *images, "-o", str(bundle))
    assert result.code == 0, result.err
    return bundle, result


async def edge_mirror(start_mirror, tmp_path):
    """A mirror whose upstreams cannot be reached, in offline mode: it has only what it holds."""
    upstreams = (cfg.Upstream("docker.io", DEAD, default=True, aliases=("hub",)),
                 cfg.Upstream("quay.io", DEAD, aliases=("quay",)))
    edge = await start_mirror(root=tmp_path / "edge", upstreams=upstreams,
                              server=cfg.Server(listen="127.0.0.1:0", offline=True))
    return edge, write_config(tmp_path / "edge.toml", edge.config)



async def test_export_writes_an_oci_layout_that_skopeo_reads(start_mirror, upstream, tmp_path):
    alpine, index, app = (upstream.images[n] for n in
                          ("library/alpine", "library/multiarch", "team/app"))
    bundle, result = await exported_bundle(start_mirror, tmp_path, *IMAGES)
    manifests = [alpine, index, *index.children, app]
    blobs = {**alpine.blobs, **index.blobs, **app.blobs}
    size = sum(len(m.manifest) for m in manifests) + sum(len(b) for b in blobs.values())
    assert (f"exported 3 image(s) to {bundle}: {len(manifests)} manifests, {len(blobs)} blobs"
            in result.out and f"({size} bytes)" in result.out)

    with tarfile.open(bundle) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    layout = json.loads(files["index.json"])
    assert {e["annotations"]["org.opencontainers.image.ref.name"]: e["digest"]
            for e in layout["manifests"]} == {
        "docker.io/library/alpine:3.19": alpine.digest,
        "docker.io/library/multiarch:latest": index.digest,
        "quay.io/team/app:2.0": app.digest}
    carried = {f"sha256:{n.rpartition('/')[2]}": data for n, data in files.items()
               if n.startswith("blobs/sha256/")}
    assert carried == {**{m.digest: m.manifest for m in manifests}, **blobs}  # byte-exact
    assert all(sha256(data) == digest for digest, data in carried.items())

    # skopeo picks an image of the bundle by its name (OCI-typed ones: skopeo 1.9 skips
    # Docker-typed entries in that lookup; newer ones accept them).
    dest = tmp_path / "multiarch"
    await skopeo_read(f"oci-archive:{bundle}:docker.io/library/multiarch:latest", dest, "--all")
    assert (dest / "manifest.json").read_bytes() == index.manifest
    for digest, data in index.blobs.items():
        assert (dest / digest.partition(":")[2]).read_bytes() == data


async def test_a_docker_typed_image_is_carried_byte_exact(start_mirror, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    bundle, _ = await exported_bundle(start_mirror, tmp_path, "alpine:3.19")
    dest = tmp_path / "alpine"
    await skopeo_read(f"oci-archive:{bundle}", dest)  # the bundle's only image
    assert (dest / "manifest.json").read_bytes() == alpine.manifest
    for digest, data in alpine.blobs.items():
        assert (dest / digest.partition(":")[2]).read_bytes() == data


async def skopeo_read(source: str, dest, *extra: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "skopeo", "copy", *extra, source, f"dir:{dest}", stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()


async def test_imported_images_pull_from_a_mirror_without_upstream(
        start_mirror, upstream, tmp_path, http):
    alpine, index, app = (upstream.images[n] for n in
                          ("library/alpine", "library/multiarch", "team/app"))
    bundle, _ = await exported_bundle(start_mirror, tmp_path, *IMAGES)
    edge, config = await edge_mirror(start_mirror, tmp_path)
    result = await run(config, "import", str(bundle))  # while the edge mirror runs
    assert result.code == 0, result.err
    blobs = {**alpine.blobs, **index.blobs, **app.blobs}
    assert f"imported 3 image(s) from {bundle}: 5 manifests, {len(blobs)} blobs" in result.out
    assert f"docker.io/library/alpine:3.19 {alpine.digest}" in result.out
    assert {p.name for p in edge.blob_files()} == {d.partition(":")[2] for d in blobs}

    got = await skopeo_copy(f"{edge.host}/alpine:3.19", tmp_path / "alpine")
    assert got["manifest"] == alpine.manifest and got["digest"] == alpine.digest
    assert all(got["blobs"][d] == data for d, data in alpine.blobs.items())
    got = await skopeo_copy(f"{edge.host}/multiarch:latest", tmp_path / "all", "--all")
    assert got["manifest"] == index.manifest
    assert all(got["blobs"][d] == data for d, data in index.blobs.items())
    got = await skopeo_copy(f"{edge.host}/quay.io/team/app:2.0", tmp_path / "app")
    assert got["digest"] == app.digest
    assert all(got["blobs"][d] == data for d, data in app.blobs.items())

    # A single-platform manifest also answers clients that accept no index (old Docker).
    async with http.get(f"{edge.url}/v2/alpine/manifests/3.19",
                        headers={"Accept": DOCKER_MANIFEST}) as response:
        assert response.status == 200 and await response.read() == alpine.manifest
    async with http.get(f"{edge.url}/v2/_catalog") as response:
        assert set(json.loads(await response.read())["repositories"]) >= {
            "library/alpine", "library/multiarch", "quay.io/team/app"}

    usage = SqliteMetadata(edge.root)
    try:
        assert (await usage.item(alpine.digest)).kind == "manifest"
        assert set(await usage.children(alpine.digest)) == set(alpine.blobs)
        assert set(await usage.tags_of(alpine.digest)) == {
            ("docker.io/library/alpine", "3.19", "index"),
            ("docker.io/library/alpine", "3.19", "manifest")}
        assert await usage.tags_of(index.digest) == [
            ("docker.io/library/multiarch", "latest", "index")]
        for digest, data in blobs.items():
            assert (await usage.item(digest)).size == len(data)
    finally:
        await usage.close()


async def test_a_corrupt_bundle_is_refused_and_nothing_is_stored(start_mirror, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    bundle, _ = await exported_bundle(start_mirror, tmp_path, "alpine:3.19")
    layer = max(alpine.blobs, key=lambda d: len(alpine.blobs[d]))
    corrupt = tmp_path / "corrupt.tar"
    with tarfile.open(bundle) as src, tarfile.open(corrupt, "w") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name.endswith(layer.partition(":")[2]):
                data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
            dst.addfile(member, io.BytesIO(data) if data is not None else None)

    edge, config = await edge_mirror(start_mirror, tmp_path)
    result = await run(config, "import", str(corrupt))
    assert result.code == 1
    assert f"should be {layer} but its bytes are sha256:" in result.err
    assert "nothing was imported" in result.err
    assert edge.blob_files() == []
    assert list((edge.root / "tmp").iterdir()) == []  # the spools went too
    usage = SqliteMetadata(edge.root)
    try:
        assert usage.total() == 0 and await usage.item(alpine.digest) is None
    finally:
        await usage.close()
    ls = await run(config, "ls", "--json")
    assert json.loads(ls.out) == {"repositories": []}


async def test_export_of_an_image_that_is_not_cached_names_it(mirror, tmp_path):
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    bundle = tmp_path / "bundle.tar"
    result = await run(config, "export", "alpine:3.19", "-o", str(bundle))
    assert result.code == 1
    assert "alpine:3.19 is not cached here (docker.io/library/alpine:3.19 has no tag record)" \
        in result.err
    assert not bundle.exists() and not (tmp_path / "bundle.tar.part").exists()
