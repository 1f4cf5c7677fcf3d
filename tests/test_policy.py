"""Pull policy (`[[policy.rules]]`, trust/rules.py): parsed and checked at load, decided
before any upstream request, visible in /metrics, on the status page and in `mirror ls`.

Denied pulls run through real clients (skopeo, containerd's `ctr`) against the real
upstream registry behind the counting proxy: what the client prints is asserted, and so is
that the upstream saw no request at all.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from html import escape
from pathlib import Path

import pytest

from mirror import config as cfg
from mirror.trust.rules import Rules
from tests.commands import run, write_config
from tests.conftest import sha256, skopeo_copy
from tests.support.containerd import write_hosts
from tests.support.registry import free_port

HUB = "docker.io"
ACCEPT_ALL = {"Accept": ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json"])}


def rules(*tables: dict) -> cfg.Policy:
    return cfg.Policy(tuple(cfg.PolicyRule(**{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in t.items()}) for t in tables))


def load(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "mirror.toml"
    path.write_text(text)
    return cfg.load(str(path), environ={})


async def error_of(response) -> dict:
    document = json.loads(await response.read())
    return document["errors"][0]


# -- config -----------------------------------------------------------------------------

def test_the_documented_form_loads_as_written(tmp_path):
    config = load(tmp_path, """
[[policy.rules]]
upstream = "docker.io"            # optional: all upstreams when absent
allow = ["library/*", "myorg/*"]  # repository globs, optionally ":tag" globs; empty = all
deny = ["*:latest"]               # wins over allow

[[policy.rules]]
upstream = "hosted"
platforms = ["linux/amd64", "linux/arm64/v8"]
""")
    assert config.policy.rules == (
        cfg.PolicyRule("docker.io", ("library/*", "myorg/*"), ("*:latest",)),
        cfg.PolicyRule("hosted", platforms=("linux/amd64", "linux/arm64/v8")))
    assert load(tmp_path, "").policy.rules == ()


@pytest.mark.parametrize("text, message", [
    ('[[policy.rules]]\nalow = ["x/*"]', "unknown config key: policy.rules[0].alow"),
    ('[policy]\nrule = []', "unknown config key: policy.rule"),
    ('policy = 3', "policy must be a table"),
    ('[policy]\nrules = "x"', "policy.rules must be an array of tables ([[policy.rules]])"),
    ('[[policy.rules]]\n[[policy.rules]]\ndeny = ["Library/*"]',
     "policy.rules[1].deny[0]: 'Library/*': repository names are lower case; write "
     "'library/*'"),
    ('[[policy.rules]]\ndeny = ["a/[bc]"]',
     "policy.rules[0].deny[0]: 'a/[bc]' is not a repository glob: lower-case names separated "
     "by /, with * and ? as the only wildcards"),
    ('[[policy.rules]]\nallow = ["x/y", "x//y"]', "policy.rules[0].allow[1]: 'x//y' is not a"),
    ('[[policy.rules]]\ndeny = ["*:"]', "policy.rules[0].deny[0]: '*:' has no valid tag glob"),
    ('[[policy.rules]]\ndeny = ["x/y@sha256:00"]', "policy.rules[0].deny[0]: 'x/y@sha256:00' "
     "holds a digest; rules match repositories and tags"),
    ('[[policy.rules]]\nupstream = "docker.io"\nallow = ["alpine"]',
     "policy.rules[0].allow[0]: 'alpine': Docker Hub's one-word names are matched as "
     "library/<name>; write 'library/alpine'"),
    ('[[policy.rules]]\nupstream = "docker.io"\nallow = ["docker.io/library/*"]',
     "policy.rules[0].allow[0]: 'docker.io/library/*': names are matched without the "
     "upstream's name; write 'library/*'"),
    ('[[policy.rules]]\nupstream = "example.org"',
     "policy.rules[0].upstream: no upstream 'example.org' is configured (configured: "
     "docker.io, gcr.io, ghcr.io, quay.io, registry.k8s.io; \"hosted\" for pushed "
     "repositories)"),
    ('[[policy.rules]]\nplatforms = ["linux/x86_64"]',
     "policy.rules[0].platforms[0]: 'linux/x86_64': OCI calls x86_64 'amd64'; write "
     "\"linux/amd64\""),
    ('[[policy.rules]]\nplatforms = ["linux/sparc"]',
     "policy.rules[0].platforms[0]: 'linux/sparc': unknown architecture 'sparc'"),
    ('[[policy.rules]]\nplatforms = ["beos/amd64"]',
     "policy.rules[0].platforms[0]: 'beos/amd64': unknown operating system 'beos'"),
    ('[[policy.rules]]\nplatforms = ["linux"]',
     "policy.rules[0].platforms[0]: 'linux' is not a platform: write os/architecture"),
    ('[[policy.rules]]\nplatforms = ["linux/arm/7"]',
     "policy.rules[0].platforms[0]: 'linux/arm/7': a variant is v<number>"),
])
def test_bad_rules_are_config_errors_naming_the_rule_and_the_fix(tmp_path, text, message):
    with pytest.raises(cfg.ConfigError) as caught:
        load(tmp_path, text)
    assert str(caught.value).startswith(message), str(caught.value)


def test_an_alias_names_its_upstream_and_hosted_cannot_be_an_upstream_name(tmp_path):
    config = load(tmp_path, '[[policy.rules]]\nupstream = "hub"\ndeny = ["x/*"]')
    assert Rules(config).rules[0].scope == "docker.io"
    with pytest.raises(cfg.ConfigError, match='an upstream is named "hosted"'):
        load(tmp_path, '[[upstreams]]\nname = "hosted"\nurl = "https://h.example"')


# -- semantics --------------------------------------------------------------------------

@pytest.mark.parametrize("allow, deny, name, tag, allowed", [
    ([], [], "library/alpine", "3.19", True),                  # no lists: everything
    (["myorg/*"], [], "myorg/app", "1", True),
    (["myorg/*"], [], "myorg/team/app", "1", True),           # * crosses /
    (["myorg/*"], [], "myorgx/app", "1", False),
    (["myorg/*"], [], "other/app", "1", False),               # an allow that misses denies
    (["myorg/?pp"], [], "myorg/app", "1", True),
    (["myorg/?pp"], [], "myorg//pp", "1", False),             # ? never crosses /
    (["library/alpine:3.*"], [], "library/alpine", "3.19", True),
    (["library/alpine:3.*"], [], "library/alpine", "edge", False),
    (["library/alpine:3.*"], [], "library/alpine", None, True),   # by digest: the repository
    ([], ["*:latest"], "library/alpine", "latest", False),
    ([], ["*:latest"], "library/alpine", "latest-rc", True),   # a glob matches whole tags
    ([], ["*:latest"], "library/alpine", None, True),          # a digest has no tag to deny
    ([], ["library/alpine"], "library/alpine", None, False),   # the repository: digests too
    (["library/*"], ["library/alpine"], "library/alpine", "3.19", False),  # deny wins
    (["library/*"], ["*:*-rc?"], "library/alpine", "3.20-rc1", False),
])
def test_glob_semantics(allow, deny, name, tag, allowed):
    config = cfg.Config(policy=rules({"upstream": HUB, "allow": allow, "deny": deny}))
    assert (Rules(config).verdict(HUB, name, tag) == "allowed") is allowed


def test_every_applying_rule_must_allow_and_the_first_denial_is_named():
    config = cfg.Config(policy=rules(
        {"allow": ["library/*", "myorg/*"]},          # every upstream, not hosted
        {"upstream": "quay.io", "deny": ["myorg/*:dev"]},
        {"upstream": "hosted", "deny": ["*:latest"]},
        {"upstream": HUB, "deny": ["library/busybox"]}))
    decide = Rules(config).verdict
    assert decide(HUB, "library/alpine", "latest") == "allowed"
    assert decide(HUB, "library/busybox", "1") == 'denied by policy.rules[3] deny ' \
        '"library/busybox"'
    assert decide("quay.io", "myorg/app", "dev") == 'denied by policy.rules[1] deny "myorg/*:dev"'
    assert decide("quay.io", "other/app", "dev") == 'denied by policy.rules[0] allow ' \
        '["library/*", "myorg/*"] does not match'
    assert decide("hosted", "other/app", "1") == "allowed"
    assert decide("hosted", "other/app", "latest") == 'denied by policy.rules[2] deny "*:latest"'


# -- through the mirror -----------------------------------------------------------------

async def test_a_denied_manifest_is_403_naming_the_rule_and_asks_nothing_upstream(
        start_mirror, http, upstream):
    mirror = await start_mirror(policy=rules({"upstream": HUB, "deny": ["*:latest"]},
                                             {"upstream": "quay.io", "allow": ["team/*"]}))
    alpine = upstream.images["library/alpine"]
    for method in ("GET", "HEAD"):
        async with http.request(method, f"{mirror.url}/v2/alpine/manifests/latest") as r:
            assert r.status == 403
            body = await r.read()
    async with http.get(f"{mirror.url}/v2/alpine/manifests/latest") as r:
        assert await error_of(r) == {
            "code": "DENIED",
            "message": 'policy.rules[0] deny "*:latest": docker.io/library/alpine:latest may '
                       "not be pulled through this mirror; pull an image the rules allow, or "
                       "ask its operators to change policy.rules[0]",
            "detail": {"rule": "rules[0]", "name": "library/alpine", "reference": "latest"}}
    # The name is denied for everything else the rule can see: tag list, blobs, referrers.
    for path in ("/v2/quay/library/alpine/tags/list",
                 f"/v2/quay/library/alpine/blobs/{alpine.layer_digests[0]}",
                 f"/v2/quay/library/alpine/referrers/{alpine.digest}",
                 "/v2/library/alpine/manifests/latest?ns=docker.io"):
        async with http.get(mirror.url + path) as r:
            assert r.status == 403, path
            assert (await error_of(r))["code"] == "DENIED", path
    assert body == b""  # HEAD
    assert upstream.proxy.records == []
    assert not mirror.blob_files()

    async with http.get(f"{mirror.url}/v2/alpine/manifests/3.19", headers=ACCEPT_ALL) as r:
        assert r.status == 200
        assert await r.read() == alpine.manifest
    assert upstream.proxy.count(contains="/manifests/") >= 1


async def test_skopeo_denied_pull_prints_the_rule_and_the_upstream_sees_nothing(
        start_mirror, upstream, tmp_path):
    mirror = await start_mirror(policy=rules({"upstream": HUB, "allow": ["library/*"],
                                              "deny": ["*:latest"]}))
    for reference, printed in (
            ("library/alpine:latest", 'denied: policy.rules[0] deny "*:latest": '
             "docker.io/library/alpine:latest may not be pulled through this mirror"),
            ("team/app:2.0", 'denied: policy.rules[0] allow ["library/*"] does not match: '
             "docker.io/team/app:2.0 may not be pulled")):
        proc = await asyncio.create_subprocess_exec(
            "skopeo", "copy", "--src-tls-verify=false", "--retry-times=0",
            f"docker://{mirror.host}/{reference}", f"dir:{tmp_path / 'out'}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode != 0
        # skopeo logs through logrus, which writes the message's quotes as \".
        assert printed.replace('"', '\\"') in err.decode(), err.decode()
    assert upstream.proxy.records == []
    assert not mirror.blob_files()

    # An allowed pull through the same rules is byte-exact.
    alpine = upstream.images["library/alpine"]
    got = await skopeo_copy(f"{mirror.host}/library/alpine:3.19", tmp_path / "ok")
    assert got["manifest"] == alpine.manifest
    assert got["blobs"] == alpine.blobs


async def test_ctr_denied_pull_fails_clearly_and_the_upstream_sees_nothing(
        start_mirror, upstream, containerd, tmp_path):
    mirror = await start_mirror(policy=rules({"upstream": HUB, "deny": ["library/alpine"]}))
    hosts = tmp_path / "certs.d"
    write_hosts(hosts, "docker.io", f"http://127.0.0.1:{free_port()}", [(mirror.url, "")])
    result = await containerd.pull(f"t{uuid.uuid4().hex[:12]}", "docker.io/library/alpine:3.19",
                                   hosts)
    assert result.returncode != 0
    # containerd resolves with HEAD, which has no body to carry the reason: it prints the
    # status (the rule is on the status page and in the mirror's log).
    assert f'ctr: failed to resolve reference "docker.io/library/alpine:3.19": pulling from ' \
        f"host {mirror.host} failed with status code [manifests 3.19]: 403 Forbidden" \
        in result.stderr, result.stderr
    assert upstream.proxy.records == []

    ns = f"t{uuid.uuid4().hex[:12]}"
    multiarch = upstream.images["library/multiarch"]
    (await containerd.pull(ns, "docker.io/library/multiarch:latest", hosts)).check()
    assert await containerd.image_digest(ns, "docker.io/library/multiarch:latest") == \
        multiarch.digest


async def test_cached_content_of_a_repository_denied_later_is_not_served(
        start_mirror, http, upstream, tmp_path):
    alpine = upstream.images["library/alpine"]
    first = await start_mirror(root=tmp_path / "data")
    await skopeo_copy(f"{first.host}/library/alpine:3.19", tmp_path / "warm")
    await first.server.close()
    upstream.proxy.reset()

    mirror = await start_mirror(root=tmp_path / "data", policy=rules(
        {"upstream": HUB, "deny": ["library/alpine"]}))
    for path in ("manifests/3.19", f"manifests/{alpine.digest}",
                 f"blobs/{alpine.layer_digests[0]}", f"blobs/{alpine.config_digest}"):
        async with http.get(f"{mirror.url}/v2/library/alpine/{path}") as r:
            assert r.status == 403, path
            assert (await error_of(r))["message"].startswith(
                'policy.rules[0] deny "library/alpine": docker.io/library/alpine'), path
    async with http.head(f"{mirror.url}/v2/library/alpine/blobs/{alpine.layer_digests[0]}") as r:
        assert r.status == 403  # a pull's HEAD: the repository is cached
    # The blob store is shared by every name: one no rule can judge (no upstream, not
    # hosted) gets nothing, or any denied layer could be read through it by digest.
    for path in (f"/v2/nope.example/x/blobs/{alpine.layer_digests[0]}",
                 f"/bogus/v2/library/alpine/blobs/{alpine.layer_digests[0]}",
                 f"/v2/library/alpine/blobs/{alpine.layer_digests[0]}?ns=bogus"):
        async with http.get(mirror.url + path) as r:
            assert r.status == 404, path
            assert (await error_of(r))["code"] == "NAME_UNKNOWN", path
    assert upstream.proxy.records == []
    assert len(mirror.blob_files()) == len(alpine.blobs)  # denied, not deleted


async def test_platform_rules_judge_indexes_by_offer_and_images_by_their_config(
        start_mirror, http, upstream):
    multiarch = upstream.images["library/multiarch"]
    amd64, arm64 = multiarch.children
    mirror = await start_mirror(policy=rules({"upstream": HUB, "platforms": ["linux/arm64"]}))
    url = f"{mirror.url}/v2/library/multiarch/manifests"
    async with http.get(f"{url}/latest", headers=ACCEPT_ALL) as r:
        assert r.status == 200  # offers arm64: served whole, its digest intact
        assert await r.read() == multiarch.manifest
    async with http.get(f"{url}/{arm64.digest}") as r:
        assert r.status == 200
        assert await r.read() == arm64.manifest
    async with http.get(f"{url}/{amd64.digest}") as r:
        assert r.status == 403
        assert (await error_of(r))["message"] == (
            f'policy.rules[0] platforms ["linux/arm64"] excludes linux/amd64: docker.io/library/'
            f"multiarch@{amd64.digest} may not be pulled through this mirror; pull an image "
            "the rules allow, or ask its operators to change policy.rules[0]")
    async with http.get(f"{mirror.url}/v2/library/alpine/manifests/3.19",
                        headers=ACCEPT_ALL) as r:
        assert r.status == 403  # single-platform amd64
    # No layer was fetched for a denied platform: only manifests and the configs judged.
    alpine = upstream.images["library/alpine"]
    for digest in alpine.layer_digests + amd64.layer_digests:
        assert upstream.proxy.count(contains=f"/blobs/{digest}") == 0

    none = await start_mirror(root=mirror.root.parent / "other",
                              policy=rules({"platforms": ["linux/s390x"]}))
    async with http.get(f"{none.url}/v2/library/multiarch/manifests/latest",
                        headers=ACCEPT_ALL) as r:
        assert r.status == 403
        assert (await error_of(r))["message"].startswith(
            'policy.rules[0] platforms ["linux/s390x"] offered none of linux/amd64, '
            "linux/arm64: docker.io/library/multiarch:latest")


async def test_hosted_rules_apply_to_pulls_of_pushed_repositories(start_mirror, http, upstream):
    mirror = await start_mirror(policy=rules({"upstream": "hosted", "deny": ["*:latest"]},
                                             {"deny": ["team/*"]}))
    config = b'{"architecture":"amd64","os":"linux"}'
    digest = sha256(config)
    async with http.post(f"{mirror.url}/v2/team/tool/blobs/uploads/?digest={digest}",
                         data=config) as r:
        assert r.status == 201, await r.text()
    manifest = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": digest, "size": len(config)},
                           "layers": []}).encode()
    for tag in ("latest", "1.0"):
        async with http.put(f"{mirror.url}/v2/team/tool/manifests/{tag}", data=manifest,
                            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
                            ) as r:
            assert r.status == 201, await r.text()
    async with http.get(f"{mirror.url}/v2/team/tool/manifests/latest") as r:
        assert r.status == 403
        assert (await error_of(r))["message"].startswith(
            'policy.rules[0] deny "*:latest": team/tool:latest may not be pulled')
    # Rule 1 (no upstream: every upstream) does not reach hosted repositories.
    async with http.get(f"{mirror.url}/v2/team/tool/manifests/1.0") as r:
        assert r.status == 200
        assert await r.read() == manifest
    assert upstream.proxy.records == []


async def test_decisions_are_counted_by_rule_from_zero_and_the_status_page_lists_denials(
        start_mirror, http, upstream):
    mirror = await start_mirror(policy=rules({"upstream": HUB, "deny": ["*:latest"]},
                                             {"upstream": "quay.io", "deny": ["x/*"]}))
    async with http.get(f"{mirror.url}/metrics") as r:
        text = (await r.read()).decode()
    for rule in ("rules[0]", "rules[1]", "none"):
        for decision in ("allowed", "denied"):
            assert f'mirror_policy_decisions_total{{decision="{decision}",rule="{rule}"}} 0.0' \
                in text
    async with http.get(f"{mirror.url}/v2/library/alpine/manifests/latest") as r:
        assert r.status == 403
    async with http.get(f"{mirror.url}/v2/library/alpine/manifests/3.19") as r:
        assert r.status == 200
    async with http.get(f"{mirror.url}/v2/library/alpine/manifests/3.19") as r:
        assert r.status == 200
    async with http.get(f"{mirror.url}/metrics") as r:
        text = (await r.read()).decode()
    assert 'mirror_policy_decisions_total{decision="denied",rule="rules[0]"} 1.0' in text
    assert 'mirror_policy_decisions_total{decision="allowed",rule="rules[0]"} 2.0' in text
    assert 'mirror_policy_decisions_total{decision="allowed",rule="rules[1]"} 0.0' in text

    async with http.get(f"{mirror.url}/") as r:
        page = (await r.read()).decode()
    assert "<h2>Policy</h2>" in page
    assert escape('upstream docker.io; deny ["*:latest"]') in page
    rule = escape('policy.rules[0] deny "*:latest"')
    assert "<td>127.0.0.1</td><td><code>docker.io/library/alpine:latest</code></td>" \
        f"<td>{rule}</td>" in page
    assert "docker.io/library/alpine:3.19" not in page


async def test_status_page_escapes_and_keeps_the_last_twenty_denials(start_mirror, http):
    mirror = await start_mirror(policy=rules({"upstream": HUB, "deny": ["*:t*"]}))
    for i in range(25):
        async with http.get(f"{mirror.url}/v2/library/x/manifests/t{i}") as r:
            assert r.status == 403
    async with http.get(f"{mirror.url}/") as r:
        page = (await r.read()).decode()
    shown = [i for i in range(25) if f"docker.io/library/x:t{i}<" in page]
    assert shown == list(range(5, 25))
    assert '"*:t*"' not in page and "&quot;*:t*&quot;" in page


async def test_mirror_ls_shows_each_images_verdict_under_the_current_rules(
        mirror, upstream, tmp_path):
    await skopeo_copy(f"{mirror.host}/library/alpine:3.19", tmp_path / "a")
    await skopeo_copy(f"{mirror.host}/library/alpine:latest", tmp_path / "b")
    await skopeo_copy(f"{mirror.host}/team/app:2.0", tmp_path / "c")
    path = write_config(tmp_path / "mirror.toml", mirror.config)
    with path.open("a") as f:
        f.write('[[policy.rules]]\nupstream = "docker.io"\ndeny = ["*:latest", "team/*"]\n')
    listed = json.loads((await run(path, "ls", "--json")).out)
    verdicts = {r["name"]: r["verdict"] for r in listed["repositories"]}
    assert verdicts == {
        "library/alpine": {"repository": "allowed", "tags": {
            "3.19": "allowed", "latest": 'denied by policy.rules[0] deny "*:latest"'}},
        "team/app": {"repository": 'denied by policy.rules[0] deny "team/*"',
                     "tags": {"2.0": 'denied by policy.rules[0] deny "team/*"'}}}
    table = (await run(path, "ls")).out.splitlines()
    assert table[0].split()[5] == "VERDICT"
    assert "  tags denied: latest (rules[0])  " in table[1]
    assert "  denied (rules[0])  " in table[2]


# -- the docs ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_the_trust_pages_example_loads_and_decides_as_its_table_says(tmp_path):
    page = (REPO / "docs" / "trust.md").read_text()
    example = page.split("```toml\n", 1)[1].split("```", 1)[0]
    decide = Rules(load(tmp_path, example)).verdict  # tag None: a pull by digest
    assert [decide(*request) for request in (
        (HUB, "library/alpine", "3.19"), (HUB, "library/alpine", "latest"),
        (HUB, "library/alpine", None), (HUB, "myorg/team/app", "1.4"),
        (HUB, "bitnami/redis", "7.2"), (HUB, "library/busybox", "1.36"),
        (HUB, "library/busybox", None), ("quay.io", "prometheus/prometheus", "v3.0.0-rc.1"),
        ("quay.io", "prometheus/prometheus", "latest"), ("hosted", "scratch/test", "1"),
        ("hosted", "team/app", "1"))] == [
        "allowed", 'denied by policy.rules[0] deny "*:latest"', "allowed", "allowed",
        'denied by policy.rules[0] allow ["library/*", "myorg/*"] does not match',
        'denied by policy.rules[0] deny "library/busybox"',
        'denied by policy.rules[0] deny "library/busybox"',
        'denied by policy.rules[1] deny "*:*-rc*"', "allowed",
        'denied by policy.rules[2] deny "scratch/*"', "allowed"]
    for row in page.splitlines():  # each verdict the table states is one of those above
        if row.startswith("| `") and "denied by `" in row:
            assert row.split("denied by `")[1].split("`")[0] in \
                {'policy.rules[0] deny "*:latest"', 'policy.rules[0] allow ["library/*", '
                 '"myorg/*"] does not match', 'policy.rules[0] deny "library/busybox"',
                 'policy.rules[1] deny "*:*-rc*"', 'policy.rules[2] deny "scratch/*"'}, row


def test_the_shipped_configs_commented_rules_load_when_uncommented(tmp_path):
    text = (REPO / "conf" / "mirror.toml").read_text()
    head, _, example = text.partition("# Pull policy")
    example, _, signatures = example.partition("# Signatures")
    rules_text = "\n".join(line[2:] if line.startswith("# ") else "" for line in
                           example.splitlines() if line.startswith("#"))
    rules_text = rules_text[rules_text.index("[[policy.rules]]"):]
    config = load(tmp_path, head + rules_text)
    assert [r.upstream for r in config.policy.rules] == ["docker.io", "hosted"]
    assert config.policy.rules[0].platforms == ("linux/amd64", "linux/arm64")
    scanner = text.partition("# Scanner gate")[2].partition("# Pull policy")[0]
    scanner = scanner[scanner.index("# [policy]"):]
    scanner_text = "\n".join(line[2:] for line in scanner.splitlines() if line.startswith("# "))
    gate = load(tmp_path, head.partition("# Scanner gate")[0] + scanner_text).policy
    assert (gate.scan_webhook, gate.scan_timeout, gate.scan_fail_closed,
            gate.scan_repositories) == ("http://scanner.internal:8080/scan", 30.0, True,
                                        ("myorg/*",))
    signatures = signatures[signatures.index("# [[policy.signatures]]"):]
    signed = load(tmp_path, head + '[policy]\ntrusted_root = "/etc/mirror/trusted_root.json"\n'
                  + "\n".join(
        line[2:] for line in signatures.splitlines() if line.startswith("# "))).policy
    assert [(s.upstream, s.repositories, s.key, s.mode) for s in signed.signatures] == [
        ("docker.io", ("myorg/*",), "/etc/mirror/cosign.pub", "enforce")]
    assert signed.signatures[0].identities[0][1] == \
        "https://token.actions.githubusercontent.com"
