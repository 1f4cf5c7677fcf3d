"""Signature enforcement (`[[policy.signatures]]`, trust/signatures.py) on real pulls.

Images and their cosign artifacts (tests/support/cosign.py builds them byte-for-byte) are
pushed to the real upstream registry, Distribution 2.8, which has no referrers API: bundles
are found through the referrers tag schema `sha256-<hex>`, as cosign falls back to. What the
client receives, what the upstream was asked (`fetched`) and what skopeo prints are asserted.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from mirror import config as cfg
from mirror.app import make_app
from mirror.keys import SIGNATURES
from mirror.media import references
from tests.conftest import fetched, sha256
from tests.support import cosign
from tests.support import images as imagelib
from tests.support.containerd import write_hosts
from tests.support.registry import free_port

HUB = "docker.io"
ACCEPT_ALL = {"Accept": ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])}
WORKFLOW = "https://github.com/myorg/app/.github/workflows/release.yml@refs/heads/main"
ISSUER = "https://token.actions.githubusercontent.com"


def unique(prefix: str = "myorg/app") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def key_file(tmp_path: Path, signer: cosign.Signer, name: str = "cosign.pub") -> Path:
    path = tmp_path / name
    path.write_bytes(signer.public_pem)
    return path


def policy(*rules: dict, trusted_root: str | None = None) -> cfg.Policy:
    return cfg.Policy(signatures=tuple(
        cfg.PolicySignature(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
        for r in rules), trusted_root=trusted_root)


def publish(upstream, artifacts: cosign.Registry) -> None:
    """Push what the in-memory registry holds to the real upstream, in the order it was
    made (blobs with their manifest, referrers before the index listing them)."""
    for (name, reference), (manifest, media_type) in artifacts.manifests.items():
        blobs = {d: artifacts.blobs[d] for d in references(manifest) if d in artifacts.blobs}
        tags = [] if reference.startswith("sha256:") else [reference]
        imagelib.push(upstream.registry, upstream.tokens, imagelib.Image(
            name, tags, sha256(manifest), manifest, media_type, blobs))


def signed_image(upstream, name: str, signer: cosign.Signer | None, tag: str = "1",
                 seed: str = "a", payload_digest: str | None = None) -> imagelib.Image:
    image = upstream.push_image(name, tag, seed, oci=True)
    if signer is not None:
        artifacts = cosign.Registry(referrers_api=False)
        artifacts.sign(name, image.digest, [signer],
                       payload=cosign.simple_signing_payload(payload_digest or image.digest))
        publish(upstream, artifacts)
    return image


def signed_index(upstream, name: str, signer: cosign.Signer
                 ) -> tuple[imagelib.Image, list[imagelib.Image]]:
    """A two-platform index tagged 1, signed by `signer` (its children are not signed)."""
    children = [imagelib.build_image(name, [], [{"arch": arch.encode()}], oci=True,
                                     arch=arch, label=arch) for arch in ("amd64", "arm64")]
    index = imagelib.push(upstream.registry, upstream.tokens,
                          imagelib.build_index(name, ["1"], children))
    artifacts = cosign.Registry(referrers_api=False)
    artifacts.sign(name, index.digest, [signer])
    publish(upstream, artifacts)
    return index, children


async def enforcing(start_mirror, tmp_path, signer, mode: str = "enforce", **overrides):
    path = key_file(tmp_path, signer)
    return await start_mirror(policy=policy({"upstream": HUB, "repositories": ["myorg/*"],
                                             "key": str(path), "mode": mode}), **overrides)


async def error_of(response) -> dict:
    return json.loads(await response.read())["errors"][0]


def layer_gets(upstream, image: imagelib.Image) -> int:
    return sum(fetched(upstream, "GET", f"/blobs/{d}") for d in image.layer_digests)


def sig_tag(digest: str) -> str:
    return digest.replace(":", "-") + ".sig"


# -- config ---------------------------------------------------------------------------

def test_the_documented_form_loads_as_written(tmp_path):
    path = tmp_path / "mirror.toml"
    path.write_text(f"""
[policy]
trusted_root = "/etc/mirror/trusted_root.json"   # only for keyless

[[policy.signatures]]
upstream = "docker.io"            # optional: all upstreams when absent
repositories = ["myorg/*"]        # the same glob syntax as rules (no tags)
key = "/etc/mirror/cosign.pub"    # PEM public key; or keys = [...]
mode = "enforce"                  # enforce | warn | audit

[[policy.signatures]]
repositories = ["team/*"]
# TOML 1.0: an inline table stays on one line; the array may span several.
identities = [
  {{identity = "{WORKFLOW}", issuer = "{ISSUER}"}},
]
mode = "warn"
""")
    config = cfg.load(str(path), environ={})
    first, second = config.policy.signatures
    assert config.policy.trusted_root == "/etc/mirror/trusted_root.json"
    assert (first.upstream, first.repositories, first.key, first.mode) == \
        ("docker.io", ("myorg/*",), "/etc/mirror/cosign.pub", "enforce")
    assert second.identities == ((WORKFLOW, ISSUER),)


@pytest.mark.parametrize("table, message", [
    ('key = "k.pub"\nmod = "warn"', "unknown config key: policy.signatures[0].mod"),
    ('key = "k.pub"\nmode = "block"',
     'policy.signatures[0].mode must be "enforce", "warn" or "audit", not \'block\''),
    ('repositories = ["myorg/*"]', "policy.signatures[0] needs key, keys or identities"),
    ('key = "k.pub"\nrepositories = ["myorg/*:1"]',
     "policy.signatures[0].repositories[0]: 'myorg/*:1' has a tag"),
    ('key = "k.pub"\nupstream = "nowhere.io"',
     "policy.signatures[0].upstream: no upstream 'nowhere.io' is configured"),
    ('identities = [{identity = "a@b.c", issuer = "https://i"}]',
     "policy.signatures[0].identities need policy.trusted_root"),
    ('identities = [{identity = "a@b.c", isuer = "https://i"}]',
     "unknown config key: policy.signatures[0].identities[0].isuer"),
])
def test_bad_signature_rules_are_config_errors_naming_the_key(tmp_path, table, message):
    path = tmp_path / "mirror.toml"
    path.write_text(f"[[policy.signatures]]\n{table}\n")
    with pytest.raises(cfg.ConfigError) as raised:
        cfg.load(str(path), environ={})
    assert message in str(raised.value)


def test_a_bad_key_file_stops_the_server_at_start_naming_it(tmp_path):
    path = tmp_path / "cosign.pub"
    path.write_bytes(b"not a key")
    config = cfg.Config(storage=cfg.Storage(root=str(tmp_path / "data")),
                        policy=policy({"key": str(path)}))
    with pytest.raises(cfg.ConfigError) as raised:
        make_app(config)
    assert str(raised.value).startswith(f"policy.signatures[0]: {path}: not a PEM public key")
    missing = cfg.Config(storage=cfg.Storage(root=str(tmp_path / "data")),
                         policy=policy({"key": str(tmp_path / "gone.pub")}))
    with pytest.raises(cfg.ConfigError, match="gone.pub: cannot read key file"):
        make_app(missing)


# -- enforce ----------------------------------------------------------------------------

async def test_enforce_serves_an_image_signed_with_the_key_byte_for_byte(
        start_mirror, upstream, http, tmp_path):
    signer = cosign.signer("ecdsa")
    name = unique()
    image = signed_image(upstream, name, signer)
    mirror = await enforcing(start_mirror, tmp_path, signer)
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert r.status == 200
        assert await r.read() == image.manifest
    layer = image.layer_digests[0]
    async with http.get(f"{mirror.url}/v2/{name}/blobs/{layer}") as r:
        assert await r.read() == image.blobs[layer]
    text = await (await http.get(f"{mirror.url}/metrics")).text()
    assert 'mirror_signature_verdicts_total{mode="enforce",rule="signatures[0]",' \
           'verdict="signed"} 1.0' in text
    for verdict in ("unsigned", "invalid"):
        assert 'mirror_signature_verdicts_total{mode="enforce",rule="signatures[0]",' \
               f'verdict="{verdict}"}} 0.0' in text


@pytest.mark.parametrize("case", ["wrong key", "tampered payload", "another digest",
                                  "unsigned"])
async def test_enforce_refuses_before_any_layer_is_fetched(
        start_mirror, upstream, http, tmp_path, case):
    signer, other = cosign.signer("ecdsa"), cosign.signer("ecdsa", 1)
    name = unique()
    if case == "tampered payload":
        image = upstream.push_image(name, "1", "t", oci=True)
        artifacts = cosign.Registry(referrers_api=False)
        payload = cosign.simple_signing_payload(image.digest)
        tampered = payload.replace(b"registry.example", b"registry.evil00")
        artifacts.push_signature_manifest(name, image.digest, [{
            "mediaType": cosign.SIMPLE_SIGNING, "size": len(tampered),
            "digest": artifacts.push_blob(tampered),
            "annotations": {cosign.SIGNATURE_ANNOTATION: cosign.b64(signer.sign(payload))}}])
        publish(upstream, artifacts)
    elif case == "another digest":
        image = signed_image(upstream, name, signer, payload_digest="sha256:" + "ab" * 32)
    else:
        image = signed_image(upstream, name, {"wrong key": other, "unsigned": None}[case])
    mirror = await enforcing(start_mirror, tmp_path, signer)
    key = f"{tmp_path / 'cosign.pub'} ({signer.fingerprint})"
    reason = {
        "wrong key": f"invalid: signature at {sig_tag(image.digest)} does not verify with "
                     f"key {key}",
        "tampered payload": f"invalid: signature at {sig_tag(image.digest)} does not verify "
                            f"with key {key}",
        "another digest": f"invalid: payload is for sha256:{'ab' * 32} not {image.digest}",
        "unsigned": f"unsigned: no signature at {sig_tag(image.digest)} or in referrers",
    }[case]
    for method in ("HEAD", "GET"):
        async with http.request(method, f"{mirror.url}/v2/{name}/manifests/1",
                                headers=ACCEPT_ALL) as r:
            assert r.status == 403
            if method == "GET":
                error = await error_of(r)
    assert error["code"] == "DENIED"
    assert error["message"] == (
        f"policy.signatures[0]: {HUB}/{name}:1 is {reason}; only images signed as "
        "policy.signatures[0] requires may be pulled through this mirror")
    assert error["detail"] == {"rule": "signatures[0]", "name": name, "reference": "1",
                               "digest": image.digest, "verdict": reason.split(":")[0]}
    assert layer_gets(upstream, image) == 0
    assert not [p for p in mirror.blob_files() if f"/{image.layer_digests[0][7:]}" in str(p)]


async def test_warn_serves_logs_once_and_counts(start_mirror, upstream, http, tmp_path, caplog):
    name = unique()
    image = signed_image(upstream, name, None)
    mirror = await enforcing(start_mirror, tmp_path, cosign.signer("ecdsa"), mode="warn")
    for _ in range(3):
        async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
            assert r.status == 200
            assert await r.read() == image.manifest
    warned = [r.getMessage() for r in caplog.records if "although unsigned" in r.getMessage()]
    assert warned == [f"serving {HUB}/{name}@{image.digest} although unsigned: no signature at "
                      f"{sig_tag(image.digest)} or in referrers (policy.signatures[0] warn)"]
    text = await (await http.get(f"{mirror.url}/metrics")).text()
    assert 'mirror_signature_verdicts_total{mode="warn",rule="signatures[0]",' \
           'verdict="unsigned"} 3.0' in text


async def test_audit_only_counts(start_mirror, upstream, http, tmp_path, caplog):
    name = unique()
    image = signed_image(upstream, name, cosign.signer("ecdsa", 1))
    mirror = await enforcing(start_mirror, tmp_path, cosign.signer("ecdsa"), mode="audit")
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert await r.read() == image.manifest
    assert not [r for r in caplog.records if "although" in r.getMessage()]
    text = await (await http.get(f"{mirror.url}/metrics")).text()
    assert 'mirror_signature_verdicts_total{mode="audit",rule="signatures[0]",' \
           'verdict="invalid"} 1.0' in text


async def test_names_no_rule_matches_are_not_checked(start_mirror, upstream, http, tmp_path):
    mirror = await enforcing(start_mirror, tmp_path, cosign.signer("ecdsa"))
    alpine = upstream.images["library/alpine"]
    async with http.get(f"{mirror.url}/v2/library/alpine/manifests/3.19",
                        headers=ACCEPT_ALL) as r:
        assert await r.read() == alpine.manifest
    assert fetched(upstream, contains=".sig") == 0


# -- verdict cache, moved tags, concurrency ---------------------------------------------

async def test_the_verdict_is_cached_by_digest(start_mirror, upstream, http, tmp_path):
    signer = cosign.signer("ecdsa")
    name = unique()
    image = signed_image(upstream, name, signer)
    # tag_ttl 0: the signature's tag record alone would be revalidated on every check.
    mirror = await enforcing(start_mirror, tmp_path, signer, tag_ttl=0)
    for _ in range(2):
        async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
            assert await r.read() == image.manifest
    async with http.get(f"{mirror.url}/v2/{name}/manifests/{image.digest}") as r:
        assert r.status == 200
    assert fetched(upstream, contains=f"/manifests/{sig_tag(image.digest)}") == 1
    assert fetched(upstream, contains="/blobs/") == 1  # the signature's payload, once


async def test_concurrent_pulls_verify_once(start_mirror, upstream, http, tmp_path):
    name = unique()
    image = signed_image(upstream, name, None)
    mirror = await enforcing(start_mirror, tmp_path, cosign.signer("ecdsa"))

    async def pull() -> str:
        async with http.get(f"{mirror.url}/v2/{name}/manifests/{image.digest}") as r:
            assert r.status == 403
            return (await error_of(r))["message"]

    messages = await asyncio.gather(*[pull() for _ in range(12)])
    assert len(set(messages)) == 1 and "is unsigned" in messages[0]
    # Every place cosign looks, asked once for twelve clients.
    assert fetched(upstream, contains=f"/manifests/{sig_tag(image.digest)}") == 1
    assert fetched(upstream, contains=f"/referrers/{image.digest}") == 1
    schema = f"/manifests/{image.digest.replace(':', '-')}"
    assert sum(1 for r in upstream.proxy.records if r.path.endswith(schema)) == 1


async def test_a_moved_tag_is_checked_again(start_mirror, upstream, http, tmp_path):
    signer = cosign.signer("ecdsa")
    name = unique()
    image = signed_image(upstream, name, signer)
    mirror = await enforcing(start_mirror, tmp_path, signer, tag_ttl=0)
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert await r.read() == image.manifest
    moved = signed_image(upstream, name, None, seed="b")  # unsigned, pushed as :1
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert r.status == 403
        assert f"is unsigned: no signature at {sig_tag(moved.digest)}" \
            in (await error_of(r))["message"]
    assert layer_gets(upstream, moved) == 0
    async with http.get(f"{mirror.url}/v2/{name}/manifests/{image.digest}") as r:
        assert await r.read() == image.manifest  # the signed digest stays admitted


# -- indexes, artifacts, bundles --------------------------------------------------------

async def test_a_signed_index_admits_its_children(start_mirror, upstream, http, tmp_path):
    signer = cosign.signer("ecdsa")
    name = unique()
    index, children = signed_index(upstream, name, signer)
    unsigned = unique()
    lone = imagelib.push(upstream.registry, upstream.tokens, imagelib.build_image(
        unsigned, ["1"], [{"arch": b"lone"}], oci=True))
    mirror = await enforcing(start_mirror, tmp_path, signer)
    async with http.head(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert r.status == 200  # containerd's resolve
    for child in children:
        async with http.get(f"{mirror.url}/v2/{name}/manifests/{child.digest}") as r:
            assert r.status == 200
            assert await r.read() == child.manifest
    async with http.get(f"{mirror.url}/v2/{unsigned}/manifests/{lone.digest}") as r:
        assert r.status == 403  # a child of no signed index must be signed itself
    text = await (await http.get(f"{mirror.url}/metrics")).text()
    assert 'mirror_signature_verdicts_total{mode="enforce",rule="signatures[0]",' \
           'verdict="signed"} 3.0' in text


async def test_signatures_are_served_through_the_cache_after_the_upstream_is_gone(
        start_mirror, upstream, http, tmp_path):
    signer = cosign.signer("ecdsa")
    name = unique()
    image = signed_image(upstream, name, signer)
    mirror = await enforcing(start_mirror, tmp_path, signer)
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert r.status == 200
    upstream.proxy.down()
    async with http.get(f"{mirror.url}/v2/{name}/manifests/{sig_tag(image.digest)}",
                        headers=ACCEPT_ALL) as r:
        assert r.status == 200
        signature = await r.read()
    layer = json.loads(signature)["layers"][0]
    async with http.get(f"{mirror.url}/v2/{name}/blobs/{layer['digest']}") as r:
        assert r.status == 200
        assert await r.read() == cosign.simple_signing_payload(image.digest)
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert await r.read() == image.manifest  # the verdict and tag, from the cache


async def test_a_sig_tag_pointing_at_a_runnable_image_is_judged(
        start_mirror, upstream, http, tmp_path):
    name = unique()
    image = upstream.push_image(name, "sha256-" + "cd" * 32 + ".sig", "x", oci=True)
    mirror = await enforcing(start_mirror, tmp_path, cosign.signer("ecdsa"))
    async with http.get(f"{mirror.url}/v2/{name}/manifests/{image.tags[0]}",
                        headers=ACCEPT_ALL) as r:
        assert r.status == 403


@pytest.mark.parametrize("kind", ["ecdsa", "ed25519"])
async def test_a_bundle_found_through_the_referrers_tag_schema_admits(
        start_mirror, upstream, http, tmp_path, kind):
    signer = cosign.signer(kind)
    name = unique()
    image = upstream.push_image(name, "1", "bundle", oci=True)
    artifacts = cosign.Registry(referrers_api=False)
    artifacts.attach(name, image.digest, cosign.bundle_message_signature(signer, image.manifest))
    publish(upstream, artifacts)
    mirror = await enforcing(start_mirror, tmp_path, signer)
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert r.status == 200, await r.read()
        assert await r.read() == image.manifest
    # The referrers tag schema index and the referrer itself are served, not judged.
    async with http.get(f"{mirror.url}/v2/{name}/manifests/{image.digest.replace(':', '-')}",
                        headers=ACCEPT_ALL) as r:
        assert r.status == 200
        referrer = json.loads(await r.read())["manifests"][0]["digest"]
    async with http.get(f"{mirror.url}/v2/{name}/manifests/{referrer}") as r:
        assert r.status == 200


async def test_keyless_signature_from_a_private_sigstore_admits(
        start_mirror, upstream, http, tmp_path):
    sigstore = cosign.Sigstore()
    root = tmp_path / "trusted_root.json"
    root.write_bytes(sigstore.trusted_root())
    name = unique()
    image = upstream.push_image(name, "1", "keyless", oci=True)
    artifacts = cosign.Registry(referrers_api=False)
    artifacts.attach(name, image.digest, sigstore.sign_dsse(
        cosign.in_toto_statement(image.digest), "release@myorg.example", "https://issuer.example"))
    publish(upstream, artifacts)
    other = upstream.push_image(name, "2", "keyless-other", oci=True)
    artifacts = cosign.Registry(referrers_api=False)
    artifacts.attach(name, other.digest, sigstore.sign_dsse(
        cosign.in_toto_statement(other.digest), "intruder@evil.example", "https://issuer.example"))
    publish(upstream, artifacts)
    mirror = await start_mirror(policy=policy(
        {"repositories": ["myorg/*"], "identities": [("release@myorg.example",
                                                      "https://issuer.example")]},
        trusted_root=str(root)))
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert r.status == 200, await r.read()
        assert await r.read() == image.manifest
    async with http.get(f"{mirror.url}/v2/{name}/manifests/2", headers=ACCEPT_ALL) as r:
        assert r.status == 403
        assert "certificate is for intruder@evil.example" in (await error_of(r))["message"]


# -- a real client ----------------------------------------------------------------------

async def test_skopeo_pull_of_an_unsigned_image_fails_with_the_reason(
        start_mirror, upstream, tmp_path):
    name = unique()
    image = signed_image(upstream, name, None)
    mirror = await enforcing(start_mirror, tmp_path, cosign.signer("ecdsa"))
    proc = await asyncio.create_subprocess_exec(
        "skopeo", "copy", "--src-tls-verify=false", "--retry-times=0",
        f"docker://{mirror.host}/{name}:1", f"dir:{tmp_path / 'out'}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    assert (f"denied: policy.signatures[0]: {HUB}/{name}:1 is unsigned: no signature at "
            f"{sig_tag(image.digest)} or in referrers") in err.decode(), err.decode()
    assert layer_gets(upstream, image) == 0
    # skopeo's dir: transport writes its `version` file first; no layer (or manifest) file.
    assert sorted(p.name for p in (tmp_path / "out").glob("*")) in ([], ["version"])


def test_the_app_holds_no_signature_rules_without_config(tmp_path):
    app = make_app(cfg.Config(storage=cfg.Storage(root=str(tmp_path / "data"))))
    assert not app[SIGNATURES].active


async def test_a_signature_pushed_later_is_seen_after_the_tag_ttl(
        start_mirror, upstream, http, tmp_path):
    signer = cosign.signer("ecdsa")
    name = unique()
    image = signed_image(upstream, name, None)
    mirror = await enforcing(start_mirror, tmp_path, signer, tag_ttl=0)
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert r.status == 403
    artifacts = cosign.Registry(referrers_api=False)
    artifacts.sign(name, image.digest, [signer])
    publish(upstream, artifacts)
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert await r.read() == image.manifest


async def test_the_status_page_lists_the_rules_and_the_latest_denials(
        start_mirror, upstream, http, tmp_path):
    name = unique()
    image = signed_image(upstream, name, None)
    mirror = await enforcing(start_mirror, tmp_path, cosign.signer("ecdsa"))
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert r.status == 403
    page = await (await http.get(f"{mirror.url}/")).text()
    assert "<td><code>policy.signatures[0]</code></td><td>upstream docker.io; repositories " \
           f"myorg/*; key {tmp_path / 'cosign.pub'}; enforce</td>" \
           '<td class="n">0</td><td class="n">1</td><td class="n">0</td>' in page
    assert f"<td><code>{HUB}/{name}:1</code></td><td>policy.signatures[0] unsigned: no " \
           f"signature at {sig_tag(image.digest)} or in referrers</td>" in page


@pytest.mark.parametrize("mode, status", [("enforce", 503), ("warn", 200)])
async def test_signatures_that_cannot_be_fetched_are_no_verdict(
        start_mirror, upstream, http, tmp_path, mode, status):
    signer = cosign.signer("ecdsa")
    name = unique()
    image = signed_image(upstream, name, signer)
    mirror = await enforcing(start_mirror, tmp_path, signer, mode=mode)
    upstream.proxy.status(503, match=".sig")
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert r.status == status
        body = await r.read()
    if mode == "enforce":
        error = json.loads(body)["errors"][0]
        assert error["code"] == "UNAVAILABLE"
        assert error["message"].startswith(f"the signatures of {HUB}/{name}@{image.digest} "
                                           "could not be checked (policy.signatures[0]): ")
    else:
        assert body == image.manifest
    assert layer_gets(upstream, image) == 0
    upstream.proxy.clear_faults()  # back up: the next pull is checked (nothing was kept)
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert await r.read() == image.manifest
    text = await (await http.get(f"{mirror.url}/metrics")).text()
    assert f'mirror_signature_verdicts_total{{mode="{mode}",rule="signatures[0]",' \
           'verdict="signed"} 1.0' in text


async def test_ctr_pulls_a_signed_index_and_is_refused_an_unsigned_image(
        start_mirror, upstream, containerd, tmp_path):
    signer = cosign.signer("ecdsa")
    name = unique()
    index, children = signed_index(upstream, name, signer)
    unsigned = unique()
    lone = signed_image(upstream, unsigned, None)
    mirror = await enforcing(start_mirror, tmp_path, signer)
    hosts = tmp_path / "certs.d"
    write_hosts(hosts, "docker.io", f"http://127.0.0.1:{free_port()}", [(mirror.url, "")])
    ns = f"t{uuid.uuid4().hex[:12]}"
    # containerd resolves the index by tag (HEAD), then fetches its platform's child by
    # digest: admitted by the signed index.
    (await containerd.pull(ns, f"docker.io/{name}:1", hosts)).check()
    assert await containerd.image_digest(ns, f"docker.io/{name}:1") == index.digest

    result = await containerd.pull(ns, f"docker.io/{unsigned}:1", hosts)
    assert result.returncode != 0
    assert f"pulling from host {mirror.host} failed with status code [manifests 1]: " \
        "403 Forbidden" in result.stderr, result.stderr
    assert layer_gets(upstream, lone) == 0
