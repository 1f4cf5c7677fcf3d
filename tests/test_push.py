"""The private-registry half: push (every upload flow of the spec), pull back, catalog,
content discovery and management, and hostile input that stores nothing. Which names may be
pushed is in test_push_names.py; the seed workflow with skopeo in test_seed_workflow.py."""

import asyncio
import hashlib
import json
import os

import pytest

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def absolute(mirror, location: str) -> str:
    return location if location.startswith("http") else mirror.url + location


async def push_blob(http, mirror, name, data) -> str:
    digest = digest_of(data)
    async with http.post(f"{mirror.url}/v2/{name}/blobs/uploads/") as resp:
        assert resp.status == 202
        location = absolute(mirror, resp.headers["Location"])
    async with http.put(f"{location}?digest={digest}", data=data) as resp:
        assert resp.status == 201, await resp.text()
        assert resp.headers["Docker-Content-Digest"] == digest
        assert resp.headers["Location"] == f"/v2/{name}/blobs/{digest}"
    return digest


def image_manifest(config: bytes, layers: list[bytes], **extra) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest_of(layer), "size": len(layer)} for layer in layers],
        **extra}).encode()


async def push_image(http, mirror, name, tag, seed: bytes, **extra) -> tuple[str, bytes]:
    config, layer = b'{"seed": "%s"}' % seed, os.urandom(2048) + seed
    await push_blob(http, mirror, name, config)
    await push_blob(http, mirror, name, layer)
    manifest = image_manifest(config, [layer], **extra)
    async with http.put(f"{mirror.url}/v2/{name}/manifests/{tag}", data=manifest,
                        headers={"Content-Type": MANIFEST}) as resp:
        assert resp.status == 201, await resp.text()
        assert resp.headers["Docker-Content-Digest"] == digest_of(manifest)
    return digest_of(manifest), manifest


async def error_code(resp) -> str:
    return json.loads(await resp.read())["errors"][0]["code"]


async def test_a_hosted_name_answers_unrouted_requests_and_its_misses_stay_local(mirror, http,
                                                                                upstream):
    """team/app is not cached, so it may be hosted: /v2/team/app is then the hosted one, and
    a request that names the upstream (?ns=, /hub/) still gets the upstream's."""
    _, manifest = await push_image(http, mirror, "team/app", "mine", b"hosted")
    async with http.get(f"{mirror.url}/v2/team/app/manifests/mine") as resp:
        assert await resp.read() == manifest
    async with http.get(f"{mirror.url}/v2/team/app/manifests/2.0") as resp:  # upstream has it
        assert resp.status == 404 and await error_code(resp) == "MANIFEST_UNKNOWN"
    async with http.get(f"{mirror.url}/v2/team/app/tags/list") as resp:
        assert (await resp.json())["tags"] == ["mine"]
    assert upstream.proxy.requests == []
    app = upstream.images["team/app"]
    for path in ("/v2/team/app/manifests/2.0?ns=docker.io", "/hub/v2/team/app/manifests/2.0"):
        async with http.get(mirror.url + path, headers={"Accept": app.media_type}) as resp:
            assert await resp.read() == app.manifest, path
    async with http.get(f"{mirror.url}/v2/team/app/manifests/mine?ns=docker.io") as resp:
        assert resp.status == 404 and await error_code(resp) == "MANIFEST_UNKNOWN"


async def test_monolithic_post_with_digest(mirror, http):
    data = b"monolithic blob"
    async with http.post(f"{mirror.url}/v2/mono/blobs/uploads/?digest={digest_of(data)}",
                         data=data) as resp:
        assert resp.status == 201
        assert resp.headers["Location"] == f"/v2/mono/blobs/{digest_of(data)}"
    async with http.get(f"{mirror.url}/v2/mono/blobs/{digest_of(data)}") as resp:
        assert await resp.read() == data
        assert resp.headers["Docker-Content-Digest"] == digest_of(data)


async def test_chunked_upload_status_and_out_of_order_chunk(mirror, http):
    data = os.urandom(300_000)
    async with http.post(f"{mirror.url}/v2/chunked/blobs/uploads/") as resp:
        location = absolute(mirror, resp.headers["Location"])
    async with http.patch(location, data=data[:100_000], headers={
            "Content-Range": "0-99999", "Content-Type": "application/octet-stream"}) as resp:
        assert resp.status == 202 and resp.headers["Range"] == "0-99999"
        location = absolute(mirror, resp.headers["Location"])
    async with http.get(location) as resp:
        assert resp.status == 204 and resp.headers["Range"] == "0-99999"
    async with http.patch(location, data=data[200_000:], headers={
            "Content-Range": "200000-299999"}) as resp:
        assert resp.status == 416 and await error_code(resp) == "BLOB_UPLOAD_INVALID"
    async with http.patch(location, data=data[100_000:200_000], headers={
            "Content-Range": "100000-199999"}) as resp:
        assert resp.status == 202 and resp.headers["Range"] == "0-199999"
    async with http.put(f"{location}?digest={digest_of(data)}", data=data[200_000:],
                        headers={"Content-Range": "200000-299999"}) as resp:
        assert resp.status == 201
    async with http.get(f"{mirror.url}/v2/chunked/blobs/{digest_of(data)}") as resp:
        assert await resp.read() == data


async def test_streamed_patch_without_content_range_as_docker_sends_it(mirror, http):
    data = os.urandom(1 << 20)
    async with http.post(f"{mirror.url}/v2/streamed/blobs/uploads/") as resp:
        location = absolute(mirror, resp.headers["Location"])

    async def body():
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]
    async with http.patch(location, data=body()) as resp:
        assert resp.status == 202 and resp.headers["Range"] == f"0-{len(data) - 1}"
    async with http.put(f"{location}?digest={digest_of(data)}") as resp:
        assert resp.status == 201


async def test_upload_survives_a_restart(start_mirror, http, tmp_path):
    first = await start_mirror(root=tmp_path / "restart")
    data = os.urandom(200_000)
    async with http.post(f"{first.url}/v2/restart/blobs/uploads/") as resp:
        path = resp.headers["Location"]
    async with http.patch(first.url + path, data=data[:120_000],
                          headers={"Content-Range": "0-119999"}) as resp:
        assert resp.status == 202
    await first.server.close()
    second = await start_mirror(root=tmp_path / "restart")
    async with http.get(second.url + path) as resp:
        assert resp.status == 204 and resp.headers["Range"] == "0-119999"
    async with http.put(f"{second.url}{path}?digest={digest_of(data)}", data=data[120_000:],
                        headers={"Content-Range": "120000-199999"}) as resp:
        assert resp.status == 201
    async with http.get(f"{second.url}/v2/restart/blobs/{digest_of(data)}") as resp:
        assert await resp.read() == data


async def test_wrong_digest_stores_nothing_and_cancel_forgets_the_upload(mirror, http):
    async with http.post(f"{mirror.url}/v2/wrong/blobs/uploads/") as resp:
        location = absolute(mirror, resp.headers["Location"])
    async with http.put(f"{location}?digest={digest_of(b'other')}", data=b"actual") as resp:
        assert resp.status == 400 and await error_code(resp) == "DIGEST_INVALID"
    assert mirror.blob_files() == [] and list((mirror.root / "uploads").iterdir()) == []
    async with http.post(f"{mirror.url}/v2/wrong/blobs/uploads/") as resp:
        location = absolute(mirror, resp.headers["Location"])
    async with http.delete(location) as resp:
        assert resp.status == 204
    async with http.get(location) as resp:
        assert resp.status == 404 and await error_code(resp) == "BLOB_UPLOAD_UNKNOWN"
    async with http.put(f"{mirror.url}/v2/wrong/blobs/uploads/{'0' * 32}?digest="
                        f"{digest_of(b'x')}", data=b"x") as resp:
        assert resp.status == 404 and await error_code(resp) == "BLOB_UPLOAD_UNKNOWN"


async def test_cross_repository_mount_from_hosted_and_from_cache(mirror, http, upstream):
    data = b"mount me"
    digest = await push_blob(http, mirror, "mount/source", data)
    async with http.post(f"{mirror.url}/v2/mount/target/blobs/uploads/?mount={digest}"
                         f"&from=mount/source") as resp:
        assert resp.status == 201 and resp.headers["Location"] == f"/v2/mount/target/blobs/{digest}"
    async with http.get(f"{mirror.url}/v2/mount/target/blobs/{digest}") as resp:
        assert await resp.read() == data
    # A layer the cache holds can be mounted too: no upload, no second copy.
    alpine = upstream.images["library/alpine"]
    layer = alpine.layer_digests[0]
    async with http.get(f"{mirror.url}/v2/library/alpine/blobs/{layer}") as resp:
        await resp.read()
    while layer in mirror.proxy.fills.active:  # its last bytes go out just before the commit
        await asyncio.sleep(0.01)
    async with http.post(f"{mirror.url}/v2/mount/target/blobs/uploads/?mount={layer}"
                         f"&from=library/alpine") as resp:
        assert resp.status == 201
    # Unknown blob: an ordinary upload starts instead.
    async with http.post(f"{mirror.url}/v2/mount/target/blobs/uploads/?mount="
                         f"{digest_of(b'nowhere')}&from=mount/source") as resp:
        assert resp.status == 202 and "/blobs/uploads/" in resp.headers["Location"]


async def test_manifest_validation(mirror, http):
    config, layer = b"{}", b"layer"
    await push_blob(http, mirror, "valid", config)
    missing = image_manifest(config, [layer])
    async with http.put(f"{mirror.url}/v2/valid/manifests/t", data=missing,
                        headers={"Content-Type": MANIFEST}) as resp:
        assert resp.status == 400 and await error_code(resp) == "MANIFEST_BLOB_UNKNOWN"
    await push_blob(http, mirror, "valid", layer)
    manifest = image_manifest(config, [layer])
    async with http.put(f"{mirror.url}/v2/valid/manifests/{digest_of(b'not it')}", data=manifest,
                        headers={"Content-Type": MANIFEST}) as resp:
        assert resp.status == 400 and await error_code(resp) == "DIGEST_INVALID"
    async with http.put(f"{mirror.url}/v2/valid/manifests/t", data=b"{not json",
                        headers={"Content-Type": MANIFEST}) as resp:
        assert resp.status == 400 and await error_code(resp) == "MANIFEST_INVALID"
    huge = image_manifest(config, [layer], annotations={"x": "y" * (5 << 20)})
    async with http.put(f"{mirror.url}/v2/valid/manifests/t", data=huge,
                        headers={"Content-Type": MANIFEST}) as resp:
        assert resp.status == 413
    async with http.get(f"{mirror.url}/v2/valid/manifests/t") as resp:
        assert resp.status == 404  # none of the refused manifests was stored
    async with http.put(f"{mirror.url}/v2/valid/manifests/{digest_of(manifest)}", data=manifest,
                        headers={"Content-Type": MANIFEST}) as resp:
        assert resp.status == 201
    async with http.get(f"{mirror.url}/v2/valid/manifests/{digest_of(manifest)}") as resp:
        assert await resp.read() == manifest and resp.headers["Content-Type"] == MANIFEST
    async with http.head(f"{mirror.url}/v2/valid/manifests/{digest_of(manifest)}") as resp:
        assert resp.headers["Content-Length"] == str(len(manifest))


async def test_index_needs_its_manifests_first(mirror, http):
    child, child_manifest = await push_image(http, mirror, "multi", "amd64", b"child")
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        {"mediaType": MANIFEST, "digest": child, "size": len(child_manifest),
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": MANIFEST, "digest": digest_of(b"absent"), "size": 1}]}).encode()
    async with http.put(f"{mirror.url}/v2/multi/manifests/latest", data=index,
                        headers={"Content-Type": INDEX}) as resp:
        assert resp.status == 400 and await error_code(resp) == "MANIFEST_BLOB_UNKNOWN"


async def test_tags_and_catalog_paginate(mirror, http):
    for tag in ("b", "a", "c"):
        await push_image(http, mirror, "paged", tag, tag.encode())
    async with http.get(f"{mirror.url}/v2/paged/tags/list?n=2") as resp:
        assert (await resp.json())["tags"] == ["a", "b"]
        assert resp.headers["Link"] == '</v2/paged/tags/list?n=2&last=b>; rel="next"'
    async with http.get(f"{mirror.url}/v2/paged/tags/list?n=2&last=b") as resp:
        assert (await resp.json())["tags"] == ["c"] and "Link" not in resp.headers
    await push_image(http, mirror, "another", "x", b"x")
    async with http.get(f"{mirror.url}/v2/_catalog?n=1") as resp:
        assert (await resp.json())["repositories"] == ["another"]
        assert resp.headers["Link"] == '</v2/_catalog?n=1&last=another>; rel="next"'


async def test_referrers_list_manifests_with_a_subject(mirror, http):
    subject, subject_manifest = await push_image(http, mirror, "refs", "v1", b"subject")
    config = b"{}"
    await push_blob(http, mirror, "refs", config)
    signature = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(config),
                   "size": len(config)}, "layers": [],
        "subject": {"mediaType": MANIFEST, "digest": subject, "size": len(subject_manifest)},
        "annotations": {"signed-by": "test"}}).encode()
    async with http.put(f"{mirror.url}/v2/refs/manifests/{digest_of(signature)}", data=signature,
                        headers={"Content-Type": MANIFEST}) as resp:
        assert resp.status == 201 and resp.headers["OCI-Subject"] == subject
    async with http.get(f"{mirror.url}/v2/refs/referrers/{subject}") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == INDEX
        assert "OCI-Filters-Applied" not in resp.headers
        assert (await resp.json())["manifests"] == [{
            "mediaType": MANIFEST, "digest": digest_of(signature), "size": len(signature),
            "artifactType": "application/vnd.example.sig", "annotations": {"signed-by": "test"}}]
    async with http.get(f"{mirror.url}/v2/refs/referrers/{subject}?artifactType=other") as resp:
        assert (await resp.json())["manifests"] == []
        assert resp.headers["OCI-Filters-Applied"] == "artifactType"
    async with http.get(f"{mirror.url}/v2/refs/referrers/{digest_of(b'none')}") as resp:
        assert resp.status == 200 and (await resp.json())["manifests"] == []
    async with http.delete(f"{mirror.url}/v2/refs/manifests/{digest_of(signature)}") as resp:
        assert resp.status == 202
    async with http.get(f"{mirror.url}/v2/refs/referrers/{subject}") as resp:
        assert (await resp.json())["manifests"] == []


async def test_delete_tag_manifest_and_blob(mirror, http):
    digest, manifest = await push_image(http, mirror, "gone", "t1", b"gone")
    async with http.put(f"{mirror.url}/v2/gone/manifests/t2", data=manifest,
                        headers={"Content-Type": MANIFEST}) as resp:
        assert resp.status == 201
    async with http.delete(f"{mirror.url}/v2/gone/manifests/t1") as resp:
        assert resp.status == 202
    async with http.get(f"{mirror.url}/v2/gone/tags/list") as resp:
        assert (await resp.json())["tags"] == ["t2"]
    async with http.delete(f"{mirror.url}/v2/gone/manifests/{digest}") as resp:
        assert resp.status == 202
    for ref in ("t2", digest):
        async with http.get(f"{mirror.url}/v2/gone/manifests/{ref}") as resp:
            assert resp.status == 404 and await error_code(resp) == "MANIFEST_UNKNOWN"
    layer = json.loads(manifest)["layers"][0]["digest"]
    async with http.delete(f"{mirror.url}/v2/gone/blobs/{layer}") as resp:
        assert resp.status == 202
    async with http.get(f"{mirror.url}/v2/gone/blobs/{layer}") as resp:
        assert resp.status == 404 and await error_code(resp) == "BLOB_UNKNOWN"
    async with http.delete(f"{mirror.url}/v2/gone/blobs/{layer}") as resp:
        assert resp.status == 404


@pytest.mark.parametrize("method, path, headers, code, status", [
    ("PATCH", "/v2/hostile/blobs/uploads/{upload}", {"Content-Range": "bytes=zz"},
     "BLOB_UPLOAD_INVALID", 400),
    ("PATCH", "/v2/hostile/blobs/uploads/{upload}", {"Content-Range": "5-1"},
     "BLOB_UPLOAD_INVALID", 400),
    ("PATCH", "/v2/hostile/blobs/uploads/{upload}", {"Content-Range": "0-99"},
     "BLOB_UPLOAD_INVALID", 400),  # the body is shorter than announced
    ("PUT", "/v2/hostile/blobs/uploads/{upload}?digest=sha256:totallywrong", {},
     "DIGEST_INVALID", 400),
    ("PUT", "/v2/hostile/blobs/uploads/{upload}", {}, "DIGEST_INVALID", 400),
    ("PATCH", "/v2/hostile/blobs/uploads/../../etc", {}, "NAME_INVALID", 400),
    ("GET", "/v2/hostile/blobs/uploads/not-an-upload-id", {}, "BLOB_UPLOAD_UNKNOWN", 404),
    ("PUT", "/v2/hostile/manifests/sha256:totallywrong", {}, "DIGEST_INVALID", 400),
    ("PUT", "/v2/Hostile/manifests/latest", {}, "NAME_INVALID", 400),
    ("PUT", "/v2/a/%2e%2e/b/manifests/latest", {}, "NAME_INVALID", 400),
])
async def test_hostile_push_input_gets_the_specs_error_and_stores_nothing(mirror, http, method,
                                                                         path, headers, code,
                                                                         status):
    from yarl import URL
    async with http.post(f"{mirror.url}/v2/hostile/blobs/uploads/") as resp:
        upload = resp.headers["Location"].rsplit("/", 1)[1]
    url = URL(mirror.url + path.format(upload=upload), encoded=True)
    async with http.request(method, url, data=b"0123456789", headers=headers) as resp:
        assert resp.status == status, await resp.text()
        assert await error_code(resp) == code
    assert mirror.blob_files() == []
    async with http.get(f"{mirror.url}/v2/hostile/blobs/uploads/{upload}") as resp:
        assert resp.headers.get("Range") in ("0-0", None)  # nothing was appended
    async with http.get(f"{mirror.url}/v2/_catalog") as resp:
        assert (await resp.json())["repositories"] == []


async def test_abandoned_upload_is_removed_after_its_ttl(start_mirror, http, tmp_path):
    from mirror import config as cfg
    mirror = await start_mirror(root=tmp_path / "ttl", hosted=cfg.Hosted(upload_ttl=0.4))
    async with http.post(f"{mirror.url}/v2/abandoned/blobs/uploads/") as resp:
        location = absolute(mirror, resp.headers["Location"])
    async with http.patch(location, data=b"half") as resp:
        assert resp.status == 202
    await asyncio.sleep(1.0)
    async with http.get(location) as resp:
        assert resp.status == 404 and await error_code(resp) == "BLOB_UPLOAD_UNKNOWN"
    assert list((mirror.root / "uploads").iterdir()) == []


async def test_a_name_may_contain_manifests_and_blobs_segments(mirror, http):
    """/v2/a/manifests/b/manifests/latest is the name a/manifests/b (distribution-spec)."""
    digest, manifest = await push_image(http, mirror, "a/manifests/b", "latest", b"segments")
    async with http.get(f"{mirror.url}/v2/a/manifests/b/manifests/latest") as resp:
        assert await resp.read() == manifest
    async with http.get(f"{mirror.url}/v2/a/manifests/b/tags/list") as resp:
        assert await resp.json() == {"name": "a/manifests/b", "tags": ["latest"]}
    layer = json.loads(manifest)["layers"][0]["digest"]
    async with http.head(f"{mirror.url}/v2/a/manifests/b/blobs/{layer}") as resp:
        assert resp.status == 200
