"""`mirror ls` shows each tag's signature verdict, computed offline from what storage holds.

Images and their cosign signatures are pushed to the real upstream (Distribution 2.8, as in
test_signatures.py), pulled through a mirror whose rule only warns (so unsigned images are
cached too, with whatever signature artifacts verification fetched), and the mirror is
stopped. `mirror ls` then runs in a subprocess against the same storage with an enforcing
rule; the upstream's counting proxy must see no request from it.
"""

from __future__ import annotations

import json
import time

from mirror import config as cfg
from mirror.ops.inventory import _listing
from tests.commands import run, write_config
from tests.support import cosign
from tests.test_signatures import (
    ACCEPT_ALL,
    enforcing,
    key_file,
    signed_image,
    signed_index,
    unique,
)


def with_signature_rule(path, mirror, key, mode: str = "enforce"):
    """The mirror's storage and upstreams, plus one `[[policy.signatures]]` rule."""
    write_config(path, mirror.config)
    with open(path, "a") as file:
        file.write(f'[[policy.signatures]]\nupstream = "docker.io"\n'
                   f'repositories = ["myorg/*"]\nkey = {json.dumps(str(key))}\n'
                   f'mode = "{mode}"\n')
    return path


async def pulled_through_warn(start_mirror, upstream, http, tmp_path, signer, mode="warn"):
    """A signed and an unsigned image (and alpine, which no rule covers), pulled through a
    mirror that warns, which is then stopped: (signed, unsigned, mirror)."""
    signed_name, unsigned_name = unique(), unique()
    signed = signed_image(upstream, signed_name, signer)
    unsigned = signed_image(upstream, unsigned_name, None, seed="u")
    if mode is None:  # no signature rule: nothing but the images is fetched
        mirror = await start_mirror()
    else:
        mirror = await enforcing(start_mirror, tmp_path / "served", signer, mode=mode)
    for name, image in ((signed_name, signed), (unsigned_name, unsigned),
                        ("library/alpine", upstream.images["library/alpine"])):
        reference = "3.19" if name == "library/alpine" else "1"
        async with http.get(f"{mirror.url}/v2/{name}/manifests/{reference}",
                            headers=ACCEPT_ALL) as r:
            assert r.status == 200
            assert await r.read() == image.manifest
    await mirror.server.close()
    return (signed_name, signed), (unsigned_name, unsigned), mirror


async def ls_offline(upstream, config, *args):
    """`mirror ls ARGS` with the upstream counting: it must be asked nothing."""
    before = len(upstream.proxy.records)
    result = await run(config, "ls", *args)
    assert upstream.proxy.records[before:] == []
    return result


def by_name(result) -> dict:
    assert result.code == 0, result.err
    return {r["name"]: r for r in json.loads(result.out)["repositories"]}


def sig_tag(digest: str) -> str:
    return digest.replace(":", "-") + ".sig"


async def test_ls_shows_signed_unsigned_and_not_required_without_the_network(
        start_mirror, upstream, http, tmp_path):
    signer = cosign.signer("ecdsa")
    (tmp_path / "served").mkdir()
    (signed_name, signed), (unsigned_name, unsigned), mirror = await pulled_through_warn(
        start_mirror, upstream, http, tmp_path, signer)
    key = key_file(tmp_path, signer)
    config = with_signature_rule(tmp_path / "mirror.toml", mirror, key)

    found = by_name(await ls_offline(upstream, config, "--json"))
    signature_tag = sig_tag(signed.digest)
    # Verification's own fetch is cached: the .sig tag is listed, and not judged itself.
    assert set(found[signed_name]["tags"]) == {"1", signature_tag}
    assert found[signed_name]["signatures"] == {
        "1": {"digest": signed.digest, "verdict": "signed", "rules": [
            {"rule": "signatures[0]", "mode": "enforce", "verdict": "signed",
             "reason": f"key {key}"}]},
        signature_tag: {"digest": found[signed_name]["tags"][signature_tag]["index"],
                        "verdict": "not judged (a signature artifact)", "rules": []}}
    assert found[unsigned_name]["signatures"] == {
        "1": {"digest": unsigned.digest, "verdict": "unsigned", "rules": [
            {"rule": "signatures[0]", "mode": "enforce", "verdict": "unsigned",
             "reason": "no signature cached"}]}}
    alpine = upstream.images["library/alpine"]
    assert found["library/alpine"]["signatures"] == {
        "3.19": {"digest": alpine.digest, "verdict": "not required", "rules": []}}

    result = await ls_offline(upstream, config)
    assert result.code == 0, result.err
    # Columns padded to the widest cell: compared with runs of spaces made one.
    rows = {line.split()[0]: " ".join(line.split()) for line in result.out.splitlines()[1:]}
    assert rows[signed_name].endswith(
        f" allowed 1, {signature_tag} signed (policy.signatures[0] enforce, key {key})")
    assert rows[unsigned_name].endswith(
        " allowed 1 unsigned (policy.signatures[0] enforce, no signature cached)")
    assert rows["library/alpine"].endswith(" allowed 3.19 not required")

    # The time `ls` spends on its listing, in-process, with the rule and without it.
    timings = {}
    for label, path in (("signature rule", config),
                        ("no rule", write_config(tmp_path / "plain.toml", mirror.config))):
        loaded = cfg.load(str(path), environ={})
        started = time.perf_counter()
        for _ in range(5):
            await _listing(loaded)
        timings[label] = (time.perf_counter() - started) / 5
        started = time.perf_counter()
        assert (await run(path, "ls")).code == 0
        timings[label + ", whole command"] = time.perf_counter() - started
    print(f"mirror ls listing: {timings}")


async def test_a_wrong_key_in_the_config_is_invalid_with_the_reason(
        start_mirror, upstream, http, tmp_path):
    signer, other = cosign.signer("ecdsa"), cosign.signer("ecdsa", 1)
    (tmp_path / "served").mkdir()
    (signed_name, signed), (unsigned_name, _), mirror = await pulled_through_warn(
        start_mirror, upstream, http, tmp_path, signer)
    wrong = key_file(tmp_path, other, "other.pub")
    config = with_signature_rule(tmp_path / "mirror.toml", mirror, wrong)

    found = by_name(await ls_offline(upstream, config, "--json"))
    reason = (f"signature at {sig_tag(signed.digest)} does not verify with key "
              f"{wrong} ({other.fingerprint})")
    assert found[signed_name]["signatures"]["1"] == {
        "digest": signed.digest, "verdict": "invalid", "rules": [
            {"rule": "signatures[0]", "mode": "enforce", "verdict": "invalid",
             "reason": reason}]}
    assert found[unsigned_name]["signatures"]["1"]["rules"][0]["reason"] == \
        "no signature cached"
    result = await ls_offline(upstream, config)
    row = next(line for line in result.out.splitlines() if line.startswith(signed_name))
    assert row.endswith(f"  invalid (policy.signatures[0] enforce, {reason})")


async def test_a_signature_never_fetched_through_the_mirror_is_not_cached(
        start_mirror, upstream, http, tmp_path):
    """Pulled while no rule asked for signatures: `ls` cannot see the upstream's one."""
    signer = cosign.signer("ecdsa")
    (signed_name, signed), _, mirror = await pulled_through_warn(
        start_mirror, upstream, http, tmp_path, signer, mode=None)
    config = with_signature_rule(tmp_path / "mirror.toml", mirror, key_file(tmp_path, signer))
    found = by_name(await ls_offline(upstream, config, "--json"))
    assert set(found[signed_name]["tags"]) == {"1"}
    assert found[signed_name]["signatures"]["1"]["verdict"] == "unsigned"
    assert found[signed_name]["signatures"]["1"]["rules"][0]["reason"] == \
        "no signature cached"


async def test_a_bad_key_file_stops_ls_as_it_stops_serve(mirror, tmp_path):
    bad = tmp_path / "cosign.pub"
    bad.write_bytes(b"not a key")
    config = with_signature_rule(tmp_path / "mirror.toml", mirror, bad)
    result = await run(config, "ls")
    assert result.code == 1
    assert result.out == ""
    assert result.err.startswith(
        f"mirror: config error: policy.signatures[0]: {bad}: not a PEM public key")


async def test_a_signed_multi_arch_index_shows_signed(
        start_mirror, upstream, http, tmp_path):
    signer = cosign.signer("ecdsa")
    name = unique()
    index, children = signed_index(upstream, name, signer)
    (tmp_path / "served").mkdir()
    mirror = await enforcing(start_mirror, tmp_path / "served", signer, mode="warn")
    async with http.get(f"{mirror.url}/v2/{name}/manifests/1", headers=ACCEPT_ALL) as r:
        assert await r.read() == index.manifest
    async with http.get(f"{mirror.url}/v2/{name}/manifests/{children[1].digest}") as r:
        assert await r.read() == children[1].manifest
    await mirror.server.close()
    key = key_file(tmp_path, signer)
    config = with_signature_rule(tmp_path / "mirror.toml", mirror, key)
    found = by_name(await ls_offline(upstream, config, "--json"))
    assert found[name]["signatures"]["1"] == {
        "digest": index.digest, "verdict": "signed", "rules": [
            {"rule": "signatures[0]", "mode": "enforce", "verdict": "signed",
             "reason": f"key {key}"}]}
