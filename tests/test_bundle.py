"""Air gap: export cached images as an OCI layout tar, import it into a mirror with no upstream."""

import asyncio
import io
import json
import tarfile
import time

from mirror import config as cfg
from mirror.media import DOCKER_MANIFEST
from mirror.storage.sqlite import SqliteMetadata
from tests.commands import run, write_config
from tests.conftest import fetched, sha256, skopeo_copy
from tests.test_push import INDEX, MANIFEST, push_image

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


async def test_an_upstream_named_host_and_port_prefetches_exports_and_imports(
        start_mirror, upstream, tmp_path, http):
    # containerd sends ?ns=<host:port> for a registry on a port, so that is the upstream's
    # name in the config; the commands take images under it as the full reference says.
    app = upstream.images["team/app"]
    named = "127.0.0.1:15300"
    source = await start_mirror(root=tmp_path / "source", upstreams=(
        cfg.Upstream("docker.io", upstream.url, default=True),
        cfg.Upstream(named, upstream.url)))
    config = write_config(tmp_path / "source.toml", source.config)
    result = await run(config, "prefetch", f"{named}/team/app:2.0", "--mirror", source.url)
    assert result.code == 0, result.err
    assert f"ok {named}/team/app:2.0 {app.digest}" in result.out
    assert fetched(upstream, "GET", "/v2/team/app/manifests/2.0") == 1
    bundle = tmp_path / "bundle.tar"
    result = await run(config, "export", f"{named}/team/app:2.0", "-o", str(bundle))
    assert result.code == 0, result.err
    with tarfile.open(bundle) as tar:
        layout = json.loads(tar.extractfile("index.json").read())
    assert [e["annotations"]["org.opencontainers.image.ref.name"]
            for e in layout["manifests"]] == [f"{named}/team/app:2.0"]

    edge = await start_mirror(root=tmp_path / "edge", upstreams=(
        cfg.Upstream("docker.io", DEAD, default=True), cfg.Upstream(named, DEAD)),
        server=cfg.Server(listen="127.0.0.1:0", offline=True))
    result = await run(write_config(tmp_path / "edge.toml", edge.config), "import", str(bundle))
    assert result.code == 0, result.err
    assert f"  {named}/team/app:2.0 {app.digest}" in result.out
    ns = "?ns=127.0.0.1%3A15300"
    async with http.get(f"{edge.url}/v2/team/app/manifests/2.0{ns}",
                        headers={"Accept": app.media_type}) as response:
        assert response.status == 200 and await response.read() == app.manifest
    for digest, data in app.blobs.items():
        async with http.get(f"{edge.url}/v2/team/app/blobs/{digest}{ns}") as response:
            assert sha256(await response.read()) == digest == sha256(data)


async def test_image_names_under_a_port_that_are_invalid_or_unknown_are_refused(
        mirror, tmp_path):
    config = write_config(tmp_path / "mirror.toml", mirror.config)
    result = await run(config, "export", "127.0.0.1:15300/Team/App:1", "-o",
                       str(tmp_path / "b.tar"))
    assert (result.code, result.err) == (1, "mirror: 127.0.0.1:15300/Team/App:1: invalid "
                                            "repository name 'Team/App': lower-case letters, "
                                            "digits and separators (. _ __ -) in /-separated "
                                            "components\n")
    result = await run(config, "export", "127.0.0.1:15300/team/app:1", "-o",
                       str(tmp_path / "b.tar"))
    assert (result.code, result.err) == (
        1, "mirror: 127.0.0.1:15300/team/app:1: no upstream named 127.0.0.1:15300 is "
           "configured here (configured: docker.io, hub, quay, quay.io)\n")
    # prefetch asks the mirror (--mirror may have other upstreams than --config), which
    # answers as it answers containerd: NAME_UNKNOWN, and no upstream request.
    result = await run(config, "prefetch", "127.0.0.1:15300/team/app:1", "--mirror", mirror.url)
    assert result.code == 1 and result.out.splitlines()[0] == (
        "failed 127.0.0.1:15300/team/app:1: manifest 1: NAME_UNKNOWN: no upstream is "
        "configured for ns='127.0.0.1:15300'")
    assert not (tmp_path / "b.tar").exists()


async def test_a_pushed_image_exports_and_imports_into_a_hosted_repository(
        start_mirror, upstream, tmp_path, http):
    source = await start_mirror(root=tmp_path / "source")
    one, one_body = await push_image(http, source, "team/tool", "1.0", b"one")
    two, two_body = await push_image(http, source, "team/tool", "arm64", b"two")
    index_body = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": MANIFEST, "digest": d, "size": len(b),
         "platform": {"os": "linux", "architecture": arch}}
        for d, b, arch in ((one, one_body, "amd64"), (two, two_body, "arm64"))]}).encode()
    async with http.put(f"{source.url}/v2/team/tool/manifests/multi", data=index_body,
                        headers={"Content-Type": INDEX}) as response:
        assert response.status == 201, await response.text()
    blobs = {}
    for body in (one_body, two_body):
        document = json.loads(body)
        for descriptor in [document["config"], *document["layers"]]:
            async with http.get(f"{source.url}/v2/team/tool/blobs/"
                                f"{descriptor['digest']}") as response:
                blobs[descriptor["digest"]] = await response.read()
    config = write_config(tmp_path / "source.toml", source.config)
    bundle = tmp_path / "bundle.tar"
    result = await run(config, "export", "team/tool:1.0", "team/tool:multi", "-o", str(bundle))
    assert result.code == 0, result.err
    assert f"exported 2 image(s) to {bundle}: 3 manifests, 4 blobs" in result.out
    with tarfile.open(bundle) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    assert [(e["digest"], e["annotations"]) for e in json.loads(files["index.json"])["manifests"]] \
        == [(one, {"org.opencontainers.image.ref.name": "team/tool:1.0", "mirror.hosted": "true"}),
            (sha256(index_body), {"org.opencontainers.image.ref.name": "team/tool:multi",
                                  "mirror.hosted": "true"})]
    carried = {f"sha256:{n.rpartition('/')[2]}": data for n, data in files.items()
               if n.startswith("blobs/sha256/")}
    assert carried == {one: one_body, two: two_body, sha256(index_body): index_body, **blobs}

    edge, edge_config = await edge_mirror(start_mirror, tmp_path)
    result = await run(edge_config, "import", str(bundle))
    assert result.code == 0, result.err
    assert f"imported 2 image(s) from {bundle}: 3 manifests, 4 blobs (4 new)" in result.out
    assert f"  team/tool:1.0 {one} (hosted)" in result.out
    assert f"  team/tool:multi {sha256(index_body)} (hosted)" in result.out
    # The running mirror learns the new hosted name on its next miss (cache/hosted.py
    # re-reads the names at most once a second): no restart.
    deadline = time.monotonic() + 10
    while True:
        async with http.get(f"{edge.url}/v2/team/tool/manifests/1.0") as response:
            if response.status == 200 or time.monotonic() > deadline:
                assert (response.status, await response.read()) == (200, one_body)
                break
        await asyncio.sleep(0.2)
    for tag, body in (("1.0", one_body), ("multi", index_body), (two, two_body)):
        async with http.get(f"{edge.url}/v2/team/tool/manifests/{tag}") as response:
            assert response.status == 200 and await response.read() == body
            assert response.headers["Docker-Content-Digest"] == sha256(body)
    for digest, data in blobs.items():
        async with http.get(f"{edge.url}/v2/team/tool/blobs/{digest}") as response:
            assert await response.read() == data and sha256(data) == digest
    async with http.get(f"{edge.url}/v2/team/tool/tags/list") as response:
        assert (await response.json())["tags"] == ["1.0", "multi"]
    async with http.get(f"{edge.url}/v2/_catalog") as response:
        assert "team/tool" in (await response.json())["repositories"]
    usage = SqliteMetadata(edge.root)
    try:
        repository = await usage.hosted("team/tool")
        assert repository.tags == {"1.0": one, "multi": sha256(index_body)}
        assert set(repository.blobs) == set(blobs)
    finally:
        await usage.close()


async def test_export_names_a_missing_tag_of_a_hosted_repository(start_mirror, tmp_path, http):
    source = await start_mirror(root=tmp_path / "source")
    await push_image(http, source, "team/tool", "1.0", b"one")
    config = write_config(tmp_path / "source.toml", source.config)
    result = await run(config, "export", "team/tool:2.0", "-o", str(tmp_path / "b.tar"))
    assert (result.code, result.err) == (
        1, "mirror: team/tool:2.0: the hosted repository team/tool has no tag 2.0 (its tags: "
           "1.0)\n")


async def test_a_pushed_image_is_refused_where_pushing_is_disabled(start_mirror, tmp_path, http):
    source = await start_mirror(root=tmp_path / "source")
    await push_image(http, source, "team/tool", "1.0", b"one")
    bundle = tmp_path / "bundle.tar"
    result = await run(write_config(tmp_path / "source.toml", source.config), "export",
                       "team/tool:1.0", "-o", str(bundle))
    assert result.code == 0, result.err
    edge, config = await edge_mirror(start_mirror, tmp_path)
    config.write_text(config.read_text() + "[hosted]\nenabled = false\n")
    result = await run(config, "import", str(bundle))
    assert (result.code, result.err) == (
        1, "mirror: team/tool:1.0 cannot be hosted here: pushing is disabled here "
           "(hosted.enabled = false); team/tool is served from upstream registries only\n")
    assert edge.blob_files() == [] and list((edge.root / "tmp").iterdir()) == []
