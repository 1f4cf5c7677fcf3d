"""The seed workflow with real skopeo: push a new name, see it in _catalog, pull it from
another host — online, offline, against Docker Hub's 401 for a missing repository, and with
no upstream reachable, never asking the upstream about the hosted name.

`docker tag` + `docker push host:5000/newhello` sends what skopeo sends here: a HEAD of each
blob of the new repository, the uploads, the manifest PUT. Docker Hub's token server grants
no action on a repository that does not exist, so a mirror that forwarded those HEADs got
401 (then 403) instead of "absent", and the push failed; offline or unreachable it got 503.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path

import pytest

from mirror import config as cfg
from tests.conftest import sha256
from tests.support.images import DOCKER_MANIFEST, Image, small_image
from tests.support.tokens import USERS

NAME = "newhello"


def write_dir(image: Image, dest: Path) -> None:
    """The image in skopeo's `dir:` layout (Directory Transport Version 1.1)."""
    dest.mkdir(parents=True)
    (dest / "version").write_text("Directory Transport Version: 1.1\n")
    (dest / "manifest.json").write_bytes(image.manifest)
    for digest, data in image.blobs.items():
        (dest / digest.removeprefix("sha256:")).write_bytes(data)


async def skopeo(home: Path, *args: str) -> None:
    """One skopeo run as a host of its own: its own HOME, so no blob-info cache is shared."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_DATA_HOME": str(home / ".local/share"),
           "XDG_RUNTIME_DIR": str(home / "run"), "REGISTRY_AUTH_FILE": str(home / "auth.json")}
    proc = await asyncio.create_subprocess_exec(
        "skopeo", "copy", "--retry-times=0", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"skopeo {' '.join(args)} failed: {err.decode()}"


def read_dir(path: Path) -> dict[str, bytes]:
    return {sha256(p.read_bytes()): p.read_bytes() for p in path.iterdir() if len(p.name) == 64}


def docker_hub_401(upstream) -> None:
    """Every upstream answer is Docker Hub's for a repository that does not exist."""
    challenge = (f'Bearer realm="{upstream.token_url}",service="{upstream.tokens.service}",'
                 f'scope="repository:library/{NAME}:pull"')
    body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required",
                                   "detail": [{"Type": "repository", "Class": "",
                                               "Name": f"library/{NAME}",
                                               "Action": "pull"}]}]}).encode()
    upstream.proxy.status(401, {"WWW-Authenticate": challenge,
                                "Content-Type": "application/json",
                                "Docker-Distribution-API-Version": "registry/2.0"}, body)


SETUPS = {
    "online": ({}, None),
    "offline": ({"server": cfg.Server(listen="127.0.0.1:0", offline=True)}, None),
    "offline-with-prefixes": ({"server": cfg.Server(listen="127.0.0.1:0", offline=True),
                               "hosted": cfg.Hosted(prefixes=("new",))}, None),
    "docker-hub-401": ({}, docker_hub_401),
    "upstream-unreachable": ({}, lambda upstream: upstream.proxy.down()),
}


@pytest.mark.parametrize("setup", list(SETUPS))
async def test_seed_push_catalog_and_pull_from_another_host_never_ask_upstream(
        start_mirror, http, upstream, tmp_path, setup):
    overrides, arrange = SETUPS[setup]
    mirror = await start_mirror(**overrides)
    image = small_image(NAME, ["latest"], f"seed-{setup}", size=200_000)
    write_dir(image, tmp_path / "source")
    if arrange is not None:
        arrange(upstream)

    await skopeo(tmp_path / "builder", "--dest-tls-verify=false", f"dir:{tmp_path / 'source'}",
                 f"docker://{mirror.host}/{NAME}:latest")
    async with http.get(f"{mirror.url}/v2/_catalog") as resp:
        assert (await resp.json())["repositories"] == [NAME]
    await skopeo(tmp_path / "other-host", "--src-tls-verify=false",
                 f"docker://{mirror.host}/{NAME}:latest", f"dir:{tmp_path / 'pulled'}")

    pulled = (tmp_path / "pulled" / "manifest.json").read_bytes()
    assert sha256(pulled) == image.digest and pulled == image.manifest
    assert read_dir(tmp_path / "pulled") == image.blobs
    # docker push of a second image mounts the layers it pushed before (from=newhello),
    # and tries a mount from a repository never cached: 202, an upload, still no upstream.
    layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
    async with http.post(f"{mirror.url}/v2/{NAME}2/blobs/uploads/?mount={layer}&from={NAME}"
                         ) as resp:
        assert resp.status == 201 and resp.headers["Docker-Content-Digest"] == layer
    async with http.get(f"{mirror.url}/v2/{NAME}2/blobs/{layer}") as resp:
        assert await resp.read() == image.blobs[layer]
    absent = "sha256:" + "7" * 64
    async with http.post(f"{mirror.url}/v2/{NAME}2/blobs/uploads/?mount={absent}"
                         "&from=library/alpine") as resp:
        assert resp.status == 202 and "Location" in resp.headers
    assert upstream.proxy.records == [] and upstream.tokens.requests == []
    stored = sorted(p.name for p in mirror.blob_files())
    assert stored == sorted(d.removeprefix("sha256:") for d in image.blobs)


async def test_the_test_upstream_answers_a_missing_repository_401_like_docker_hub(
        upstream, http):
    """The stand-in is as unkind as Docker Hub: no token grants pull on a missing name."""
    async def get(name: str, user: str | None) -> tuple[int, str]:
        params = {"service": upstream.tokens.service, "scope": f"repository:{name}:pull"}
        basic = base64.b64encode(f"{user}:{USERS.get(user)}".encode()).decode()
        headers = {"Authorization": f"Basic {basic}"} if user else {}
        async with http.get(upstream.token_url, params=params, headers=headers) as resp:
            token = (await resp.json())["token"]
        async with http.get(f"{upstream.registry_url}/v2/{name}/manifests/latest",
                            headers={"Authorization": f"Bearer {token}",
                                     "Accept": DOCKER_MANIFEST}) as resp:
            return resp.status, (await resp.json())["errors"][0]["code"] \
                if resp.status >= 400 else ""

    for user in (None, "reader"):
        assert await get(f"library/{NAME}", user) == (401, "UNAUTHORIZED")
        assert await get("library/alpine", user) == (200, "")
    # Its owner may pull (and push) what does not exist yet: seeding new names works.
    assert (await get(f"library/{NAME}", "admin"))[0] == 404
    upstream.push_image("seedcheck/fresh", "latest", "fresh")
    assert await get("seedcheck/fresh", None) == (200, "")
