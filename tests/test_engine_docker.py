"""A real Docker engine (dockerd 20.10, classic image store) pulls and pushes through the mirror.

One dockerd per module (tests/support/dockerd.py), reconfigured per test with the
daemon.json the README shows: its ```json block under **Docker** is read from README.md
and `mirror.example:5000` replaced by the test mirror's host:port, so the README cannot
drift from what is tested. The mirror's `docker.io` upstream (the default) is the stand-in
registry behind the counting proxy, so every upstream request is counted. dockerd's
`HTTPS_PROXY` is a recording proxy on loopback: when Docker gives up on the mirror it goes
to registry-1.docker.io, and that attempt shows up there as a CONNECT (and goes nowhere).
(The daemon.json written also names dockerd's identity key file, so that it lands in the
test's directory and not in /etc/docker.) Measured on a 2-core machine: dockerd answers
`docker version` about 0.3 s after it is started and takes about 1.5 s to stop; each test
takes 0.3-3.5 s, the module about 22 s with the upstream's start.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
import socket
import ssl
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import aiohttp
import pytest

from mirror import config as cfg
from mirror.app import make_app, ssl_context
from tests.conftest import fetched, mirror_config, sha256
from tests.support import missing
from tests.support.dockerd import Dockerd, RecordingProxy, trusted_ca, unavailable
from tests.support.images import DOCKER_MANIFEST


@pytest.fixture(autouse=True)
def _engine_here():
    if (reason := unavailable()) is not None:
        missing(reason)


REPO = Path(__file__).resolve().parents[1]
HUB = "registry-1.docker.io:443"
# What `docker pull` prints when its fallback to Docker Hub meets the recording proxy.
HUB_FAILED = 'Error response from daemon: Get "https://registry-1.docker.io/v2/": Bad Gateway\n'


def readme_daemon_json(host: str) -> str:
    """The README's daemon.json for Docker, for a mirror at `host` (host:port)."""
    text = (REPO / "README.md").read_text()
    block = text.split("**Docker**", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert "mirror.example:5000" in block and "registry-mirrors" in block, block
    return block.replace("mirror.example:5000", host)


def https_daemon_json(mirror_url: str) -> str:
    """The README's block for a mirror serving HTTPS: the README's HTTPS section says no
    client then needs an insecure-registry setting, so that list is emptied (dockerd keeps
    the previous value of a key a reloaded daemon.json leaves out)."""
    settings = json.loads(readme_daemon_json("mirror.example:5000"))
    settings["registry-mirrors"] = [mirror_url]
    settings["insecure-registries"] = []
    return json.dumps(settings)


@pytest.fixture(scope="module")
def proxy():
    recording = RecordingProxy().start()
    yield recording
    recording.stop()


@pytest.fixture(scope="module")
def engine(proxy):
    daemon = Dockerd(proxy.url).start()
    print(f"dockerd answered after {daemon.started_in:.2f} s")
    yield daemon
    began = time.monotonic()
    daemon.stop()
    print(f"dockerd stopped in {time.monotonic() - began:.2f} s")
    assert daemon.leftovers() == []


@pytest.fixture
async def docker(engine, proxy):
    proxy.requests.clear()
    yield engine
    await engine.reset()


def mirror_cli(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "mirror", *args], input=stdin, text=True,
                          capture_output=True, timeout=60, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def tls_init(directory: Path, *hosts: str) -> tuple[Path, Path, Path]:
    """`mirror tls init --host ... --dir D`: (ca.crt, server.crt, server.key)."""
    mirror_cli("tls", "init", *(f"--host={h}" for h in hosts), f"--dir={directory}")
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def diff_ids(image) -> list[str]:
    return json.loads(image.blobs[image.config_digest])["rootfs"]["diff_ids"]


async def save(docker: Dockerd, reference: str) -> list[bytes]:
    """The layer tars of `docker save reference`, in the image's order."""
    saved = (await docker.docker("save", reference)).check().raw
    with tarfile.open(fileobj=io.BytesIO(saved)) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))
        return [archive.extractfile(path).read() for path in manifest[0]["Layers"]]


def tar_files(layer: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def upstream_calls(upstream) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in upstream.proxy.records if r.status != 401]


async def test_docker_pull_through_registry_mirrors_fetches_each_blob_once(
        docker, start_mirror, upstream, proxy):
    alpine = upstream.images["library/alpine"]
    mirror = await start_mirror()
    docker.configure(readme_daemon_json(mirror.host))

    (await docker.docker("pull", "alpine:3.19")).check()
    image = await docker.inspect("alpine:3.19")
    assert image["RepoDigests"] == [f"alpine@{alpine.digest}"]
    assert image["Id"] == alpine.config_digest
    assert image["RootFS"]["Layers"] == diff_ids(alpine)
    assert (image["Os"], image["Architecture"]) == ("linux", "amd64")
    # The mirror revalidates the tag with a HEAD, then fetches what is new by digest, once.
    assert sorted(upstream_calls(upstream)) == sorted([
        ("HEAD", "/v2/library/alpine/manifests/3.19"),
        ("GET", f"/v2/library/alpine/manifests/{alpine.digest}"),
        *(("GET", f"/v2/library/alpine/blobs/{digest}") for digest in alpine.blobs)])
    assert proxy.requests == []
    # Unpacked into vfs: `docker save` rebuilds each layer's tar from the unpacked files
    # (and tar-split), byte-exact, so each one hashes to its diff_id again.
    saved = await save(docker, "alpine:3.19")
    assert [sha256(layer) for layer in saved] == diff_ids(alpine)
    assert tar_files(saved[0])["etc/alpine-release"] == b"3.19.0\n"

    upstream.reset()
    (await docker.docker("rmi", "alpine:3.19")).check()
    assert (await docker.docker("image", "ls", "--quiet")).check().stdout == ""
    (await docker.docker("pull", "alpine:3.19")).check()
    assert (await docker.inspect("alpine:3.19"))["RepoDigests"] == [f"alpine@{alpine.digest}"]
    assert upstream.proxy.records == [] and upstream.tokens.requests == []
    assert proxy.requests == []


async def test_docker_pulls_linux_amd64_from_a_multi_arch_index_and_no_arm64_blob(
        docker, start_mirror, upstream, proxy):
    index = upstream.images["library/multiarch"]
    amd64, arm64 = index.children
    mirror = await start_mirror()
    docker.configure(readme_daemon_json(mirror.host))

    (await docker.docker("pull", "multiarch")).check()
    image = await docker.inspect("multiarch:latest")
    # The image is known by the index's digest; what was unpacked is the amd64 child.
    assert image["RepoDigests"] == [f"multiarch@{index.digest}"]
    assert image["Id"] == amd64.config_digest
    assert (image["Os"], image["Architecture"]) == ("linux", "amd64")
    assert image["RootFS"]["Layers"] == diff_ids(amd64)
    assert sorted(upstream_calls(upstream)) == sorted([
        ("HEAD", "/v2/library/multiarch/manifests/latest"),
        ("GET", f"/v2/library/multiarch/manifests/{index.digest}"),
        ("GET", f"/v2/library/multiarch/manifests/{amd64.digest}"),
        *(("GET", f"/v2/library/multiarch/blobs/{digest}") for digest in amd64.blobs)])
    assert fetched(upstream, contains=arm64.digest) == 0
    assert all(fetched(upstream, contains=digest) == 0 for digest in arm64.blobs)
    assert sorted(p.name for p in mirror.blob_files()) == sorted(
        d.removeprefix("sha256:") for d in amd64.blobs)
    assert proxy.requests == []


async def test_docker_falls_back_to_docker_hub_when_the_mirror_is_down(
        docker, start_mirror, upstream, proxy):
    """The mirror stopped (its port closed): dockerd's connection is refused, and it does
    what it does on almost any mirror error: it starts the pull again at Docker Hub itself,
    `https://registry-1.docker.io/v2/`. Here that is a `CONNECT registry-1.docker.io:443`
    to the recording proxy (answered 502), and the pull fails with Docker Hub's URL in the
    error; on a real network the image would come from Docker Hub, uncached."""
    mirror = await start_mirror()
    await mirror.server.close()
    docker.configure(readme_daemon_json(mirror.host))

    result = await docker.docker("pull", "alpine:3.19")
    assert (result.returncode, result.stderr) == (1, HUB_FAILED)
    assert proxy.connects() == [HUB]
    assert upstream.proxy.records == []
    assert (await docker.docker("image", "ls", "--quiet")).check().stdout == ""


async def test_docker_falls_back_to_docker_hub_quickly_for_an_image_upstream_refuses(
        docker, start_mirror, upstream, proxy):
    """An image the upstream does not have (Docker Hub answers 401 for it, never 404): the
    mirror answers an error at once, and Docker goes to Docker Hub, as it would without a
    mirror; a mirror that hung instead would stall every such pull."""
    mirror = await start_mirror()
    docker.configure(readme_daemon_json(mirror.host))
    started = time.monotonic()
    result = await docker.docker("pull", "nosuchimage:latest")
    assert time.monotonic() - started < 5
    assert (result.returncode, result.stderr) == (1, HUB_FAILED)
    assert proxy.connects() == [HUB]
    # The mirror asked the upstream (token, then the tag) and passed its refusal on.
    assert any("/v2/library/nosuchimage/manifests/latest" in r.path and r.status == 401
               for r in upstream.proxy.records)


async def test_docker_pull_of_the_mirror_itself_shares_the_cache_with_registry_mirrors(
        docker, start_mirror, upstream, proxy):
    """`docker pull host:port/alpine:3.19` asks the mirror for `alpine`; for docker.io that
    is library/alpine, one cache entry with what `registry-mirrors` pulls."""
    alpine = upstream.images["library/alpine"]
    mirror = await start_mirror()
    docker.configure(readme_daemon_json(mirror.host))
    (await docker.docker("pull", f"{mirror.host}/alpine:3.19")).check()
    image = await docker.inspect(f"{mirror.host}/alpine:3.19")
    assert image["RepoDigests"] == [f"{mirror.host}/alpine@{alpine.digest}"]
    assert fetched(upstream, contains="/v2/alpine/") == 0
    assert fetched(upstream, "GET", f"/v2/library/alpine/manifests/{alpine.digest}") == 1

    (await docker.docker("rmi", f"{mirror.host}/alpine:3.19")).check()
    upstream.reset()
    (await docker.docker("pull", "alpine:3.19")).check()
    assert (await docker.inspect("alpine:3.19"))["RepoDigests"] == [f"alpine@{alpine.digest}"]
    assert upstream.proxy.records == [] and upstream.tokens.requests == []
    assert proxy.requests == []


async def push(docker: Dockerd, reference: str) -> str:
    """`docker push reference`; the manifest digest Docker reports for it."""
    result = (await docker.docker("push", reference)).check()
    found = re.search(r"^latest: digest: (sha256:[0-9a-f]{64}) size: \d+$", result.stdout, re.M)
    assert found, result.stdout
    return found.group(1)


async def assert_seed_workflow(docker: Dockerd, http, mirror_url: str, host: str, alpine,
                               context: ssl.SSLContext | None = None) -> str:
    """tag + push host/newhello, _catalog, rmi both, pull back; the pushed manifest digest.

    Docker's classic store keeps no compressed layers: a push compresses them again, so
    the pushed layer digests are new; the image (its config, so its Id) and the layers'
    uncompressed contents (diff_ids) are what must come back unchanged.
    """
    target = f"{host}/newhello"
    (await docker.docker("tag", "alpine:3.19", target)).check()
    pushed = await push(docker, target)
    async with http.get(f"{mirror_url}/v2/_catalog", ssl=context) as resp:
        # The one mirror is both: the cache of docker.io it pulled alpine through, and
        # the registry the new name was pushed to.
        assert (await resp.json())["repositories"] == ["library/alpine", "newhello"]
    async with http.get(f"{mirror_url}/v2/newhello/manifests/latest", ssl=context,
                        headers={"Accept": DOCKER_MANIFEST}) as resp:
        manifest = await resp.read()
        assert resp.headers["Docker-Content-Digest"] == pushed == sha256(manifest)
    document = json.loads(manifest)
    assert document["config"]["digest"] == alpine.config_digest
    layers = []
    for layer in document["layers"]:
        async with http.get(f"{mirror_url}/v2/newhello/blobs/{layer['digest']}",
                            ssl=context) as resp:
            layers.append(sha256(gzip.decompress(await resp.read())))
    assert layers == diff_ids(alpine)

    (await docker.docker("rmi", "alpine:3.19", target)).check()
    assert (await docker.docker("image", "ls", "--quiet")).check().stdout == ""
    (await docker.docker("pull", target)).check()
    image = await docker.inspect(target)
    assert image["RepoDigests"] == [f"{target}@{pushed}"]
    assert image["Id"] == alpine.config_digest
    assert image["RootFS"]["Layers"] == diff_ids(alpine)
    return pushed


async def test_docker_seed_workflow_over_plain_http_on_loopback(
        docker, start_mirror, upstream, proxy, http):
    alpine = upstream.images["library/alpine"]
    mirror = await start_mirror()
    docker.configure(readme_daemon_json(mirror.host))
    (await docker.docker("pull", "alpine:3.19")).check()
    upstream.reset()

    await assert_seed_workflow(docker, http, mirror.url, mirror.host, alpine)
    assert upstream.proxy.records == [] and upstream.tokens.requests == []
    assert proxy.requests == []


async def test_docker_seed_workflow_over_https_with_the_ca_from_tls_init(
        docker, start_mirror, upstream, proxy, http, tmp_path):
    """dockerd counts 127.0.0.0/8 as an insecure registry whatever daemon.json says
    (moby registry/config.go appends 127.0.0.0/8 to insecure-registries), and for an
    insecure registry it tries https first with InsecureSkipVerify and never reads
    certs.d, then http (registry/registry.go newTLSConfig, service_v2.go
    lookupV2Endpoints). So on 127.0.0.1 the CA in certs.d is not checked: a wrong one
    works too, as this test shows. What it does show is that Docker speaks TLS to it: the
    mirror serves only HTTPS. Verification is tested on ::1 below."""
    alpine = upstream.images["library/alpine"]
    ca, cert, key = tls_init(tmp_path / "tls", "127.0.0.1")
    wrong_ca = tls_init(tmp_path / "other-ca", "127.0.0.1")[0]
    mirror = await start_mirror(server=cfg.Server(
        listen="127.0.0.1:0", tls_certificate=str(cert), tls_key=str(key)))
    assert mirror.url.startswith("https://")
    context = ssl.create_default_context(cafile=str(ca))
    with pytest.raises(aiohttp.ClientError):  # plain HTTP gets no answer: only TLS is served
        async with http.get(f"http://{mirror.host}/v2/") as resp:
            await resp.read()

    docker.configure(https_daemon_json(mirror.url))
    with trusted_ca(mirror.host, ca):
        (await docker.docker("pull", "alpine:3.19")).check()
        assert fetched(upstream, "GET", f"/v2/library/alpine/manifests/{alpine.digest}") == 1
        upstream.reset()
        pushed = await assert_seed_workflow(docker, http, mirror.url, mirror.host, alpine,
                                            context)
    with trusted_ca(mirror.host, wrong_ca):
        (await docker.docker("rmi", f"{mirror.host}/newhello")).check()
        (await docker.docker("pull", f"{mirror.host}/newhello")).check()
        assert (await docker.inspect(f"{mirror.host}/newhello"))["RepoDigests"] == [
            f"{mirror.host}/newhello@{pushed}"]
    assert upstream.proxy.records == [] and upstream.tokens.requests == []
    assert proxy.requests == []


async def test_docker_verifies_the_ca_in_certs_d_for_a_mirror_on_ipv6_loopback(
        docker, upstream, proxy, tmp_path, aiohttp_server):
    """::1 is not in 127.0.0.0/8, so dockerd treats a registry there as secure: it reads
    /etc/docker/certs.d/[::1]:PORT/ca.crt and verifies the mirror's certificate. (A
    `localhost` name resolves to 127.0.0.1 and is as unverified as 127.0.0.1 itself; and
    20.10 cannot push to [::1]:PORT, its reference grammar has no IPv6 hosts, so this is a
    pull through registry-mirrors.) With the wrong CA the handshake fails, Docker treats it
    as any mirror error and goes to Docker Hub; with the CA from `mirror tls init` the pull
    comes from the mirror."""
    if not ipv6_loopback():
        missing("no ::1 on this machine's loopback interface")
    alpine = upstream.images["library/alpine"]
    ca, cert, key = tls_init(tmp_path / "tls", "::1")
    wrong_ca = tls_init(tmp_path / "other-ca", "::1")[0]
    config = mirror_config(tmp_path / "data", upstream.url, server=cfg.Server(
        listen="[::1]:0", tls_certificate=str(cert), tls_key=str(key)))
    server = await aiohttp_server(make_app(config), host="::1", ssl=ssl_context(config))
    host = f"[::1]:{server.port}"
    docker.configure(https_daemon_json(f"https://{host}"))
    logged = len(docker.log())
    with trusted_ca(host, wrong_ca):
        result = await docker.docker("pull", "alpine:3.19")
    assert (result.returncode, result.stderr) == (1, HUB_FAILED)
    assert "x509: certificate signed by unknown authority" in docker.log()[logged:]
    assert set(proxy.connects()) == {HUB}
    assert upstream.proxy.records == []

    proxy.requests.clear()
    with trusted_ca(host, ca):
        (await docker.docker("pull", "alpine:3.19")).check()
    assert (await docker.inspect("alpine:3.19"))["RepoDigests"] == [
        f"alpine@{alpine.digest}"]
    assert fetched(upstream, "GET", f"/v2/library/alpine/manifests/{alpine.digest}") == 1
    assert proxy.requests == []


def add_user(htpasswd: Path, name: str, password: str) -> None:
    mirror_cli("user", "add", name, f"--htpasswd={htpasswd}", "--password-stdin",
               stdin=f"{password}\n")


async def test_docker_push_needs_docker_login_on_a_mirror_with_logins(
        docker, start_mirror, upstream, proxy, tmp_path):
    alpine = upstream.images["library/alpine"]
    add_user(tmp_path / "htpasswd", "alice", "wonder")
    hub = await start_mirror(root=tmp_path / "hub")
    private = await start_mirror(root=tmp_path / "private",
                                 access=cfg.Access(htpasswd=str(tmp_path / "htpasswd")))
    docker.configure(readme_daemon_json(hub.host))
    (await docker.docker("pull", "alpine:3.19")).check()
    target = f"{private.host}/newhello"
    (await docker.docker("tag", "alpine:3.19", target)).check()

    # Without a login Docker gets an anonymous token, which grants no push: the mirror's
    # 401 names the fix, and Docker prints it.
    refused = await docker.docker("push", target)
    assert (refused.returncode, refused.stderr) == (
        1, "unauthorized: log in to push to this registry\n")
    assert private.blob_files() == []
    wrong = await docker.docker("login", "-u", "alice", "--password-stdin", private.host,
                                stdin=b"nope\n")
    # The token service's own message reaches the user (Basic gave only "401 Unauthorized").
    assert (wrong.returncode, wrong.stderr) == (1, (
        f'Error response from daemon: Get "http://{private.host}/v2/": unauthorized: '
        "wrong user name or password\n"))

    login = await docker.docker("login", "-u", "alice", "--password-stdin", private.host,
                                stdin=b"wonder\n")
    assert login.check().stdout == "Login Succeeded\n"
    saved = json.loads((docker.client_config / "config.json").read_text())
    assert list(saved["auths"]) == [private.host]  # in DOCKER_CONFIG, not ~/.docker
    pushed = await push(docker, target)
    alice = "Basic " + base64.b64encode(b"alice:wonder").decode()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{private.url}/v2/newhello/manifests/latest",
                            headers={"Accept": DOCKER_MANIFEST, "Authorization": alice}) as resp:
            assert sha256(await resp.read()) == pushed
    (await docker.docker("rmi", "alpine:3.19", target)).check()
    (await docker.docker("pull", target)).check()
    image = await docker.inspect(target)
    assert image["RepoDigests"] == [f"{target}@{pushed}"]
    assert image["Id"] == alpine.config_digest
    assert fetched(upstream, contains="newhello") == 0
    assert proxy.requests == []


async def test_docker_pulls_anonymously_through_a_mirror_with_logins_in_registry_mirrors(
        docker, start_mirror, upstream, proxy, tmp_path):
    """A mirror with logins (anonymous_pull on, the default) named in registry-mirrors.
    With a Basic challenge on the ping this failed: Docker, which has no credentials for a
    mirror (it would send its docker.io login, if any), took "no basic auth credentials" as
    the mirror failing and pulled from Docker Hub instead. The ping's Bearer challenge makes
    Docker fetch an anonymous token from the mirror's realm and pull through the mirror."""
    alpine = upstream.images["library/alpine"]
    add_user(tmp_path / "htpasswd", "alice", "wonder")
    mirror = await start_mirror(access=cfg.Access(htpasswd=str(tmp_path / "htpasswd")))
    docker.configure(readme_daemon_json(mirror.host))

    (await docker.docker("pull", "alpine:3.19")).check()
    assert (await docker.inspect("alpine:3.19"))["RepoDigests"] == [f"alpine@{alpine.digest}"]
    assert proxy.requests == []  # never left for Docker Hub
    assert fetched(upstream, "GET", f"/v2/library/alpine/manifests/{alpine.digest}") == 1
    for digest in alpine.blobs:
        assert fetched(upstream, "GET", f"/v2/library/alpine/blobs/{digest}") == 1
