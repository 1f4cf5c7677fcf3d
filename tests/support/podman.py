"""A private podman for engine tests: every file it reads or writes lives under one directory.

`Podman` runs Debian's podman (4.3) as root, one subprocess per command, each killed by its
PID past a time limit. Nothing of the host's container setup is used or changed: the
storage (`vfs`, which needs no overlay mounts; `graphroot` and `runroot`), `containers.conf`
(file locks instead of the host-wide `/dev/shm/libpod_lock`), `registries.conf`, the auth
file, the libpod tmp dir, HOME, XDG dirs and TMPDIR all point into the directory, /var/lib
is the directory's own in a private mount namespace, and the environment is built from
nothing, so a developer's `REGISTRY_AUTH_FILE` or proxy settings cannot change a result.
A fallback from the mirror to the real docker.io goes to an HTTPS proxy on a closed
loopback port, so no byte leaves the machine: the pull fails instead.

Layout under the directory:

    containers.conf  storage.conf  registries.conf  auth.json
    graphroot/   images, vfs layers (one full rootfs copy per layer), libpod's bolt db
    runroot/     storage run state and locks
    tmp/         libpod tmp dir (events log, file locks) and TMPDIR for image copies
    var-lib/     /var/lib as podman sees it: containers/cache/blob-info-cache-v1.boltdb
    home/ config/ data/ run/   HOME, XDG_CONFIG_HOME, XDG_DATA_HOME, XDG_RUNTIME_DIR

`close()` unmounts whatever podman left mounted under the directory (vfs should leave
nothing; the caller asserts that) and removes it. `registries_conf_from_docs()` takes the
podman block of docs/clients.md as it is written, with only the mirror's host:port changed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .registry import free_port

BINARY = "/usr/bin/podman"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
DOC_HEADING = "## podman, CRI-O, skopeo, buildah"
DOC_HOST = "mirror.example:5000"

STORAGE_CONF = """\
[storage]
driver = "vfs"
runroot = "{root}/runroot"
graphroot = "{root}/graphroot"
"""

# tmp_dir holds the file locks too; lock_type "shm" would share /dev/shm/libpod_lock with
# every podman on the host.
CONTAINERS_CONF = """\
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
lock_type = "file"
tmp_dir = "{root}/tmp"
volume_path = "{root}/volumes"

[network]
network_config_dir = "{root}/networks"
"""


# containers/image keeps its blob-info cache (which blob digests it saw where, and which
# compressed blob holds which layer) in /var/lib/containers/cache when run as root, and
# podman 4.3 has no flag or variable to move it. So each command runs in a mount namespace
# of its own where the directory's var-lib/ is bind-mounted over /var/lib: nothing is
# shared with the host or another test, and the mount ends with the process. unshare execs
# (no --fork) and sh execs podman, so the PID started is podman's own.
PRIVATE_VAR_LIB = ("unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                   'mount --bind "$0" /var/lib && exec "$@"')


def unavailable() -> str | None:
    """Why podman cannot run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "podman tests run as root (vfs storage with its own graphroot)"
    if not os.access(BINARY, os.X_OK):
        return f"podman is not installed ({BINARY}); scripts/test.sh installs it"
    return None


def registries_conf_from_docs(host: str, docs: Path = DOCS) -> str:
    """The first TOML block under docs/clients.md's podman heading, for a mirror at `host`."""
    text = docs.read_text()
    start = text.index(DOC_HEADING)
    block = re.search(r"```toml\n(.*?)```", text[start:], re.S)
    if block is None or DOC_HOST not in block.group(1):
        raise AssertionError(f"no registries.conf block naming {DOC_HOST} under "
                             f"{DOC_HEADING!r} in {docs}")
    return block.group(1).replace(DOC_HOST, host)


@dataclass
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        assert self.returncode == 0, (
            f"podman {' '.join(self.args)} failed ({self.returncode}):\n{self.stderr[-3000:]}")
        return self


class Podman:
    def __init__(self, directory: Path, registries_conf: str = "") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        root = self.directory
        for sub in ("tmp", "home", "config", "data", "run", "var-lib"):
            (root / sub).mkdir(exist_ok=True)
        (root / "storage.conf").write_text(STORAGE_CONF.format(root=root))
        (root / "containers.conf").write_text(CONTAINERS_CONF.format(root=root))
        self.auth_file = root / "auth.json"
        # podman 4.3 refuses to start when REGISTRY_AUTH_FILE names a missing file.
        self.auth_file.write_text(json.dumps({"auths": {}}))
        self.registries_conf = root / "registries.conf"
        self.registries_conf.write_text(registries_conf)
        self.graphroot = root / "graphroot"
        # A port nobody listens on: every connection to docker.io through it is refused.
        self.proxy = f"http://127.0.0.1:{free_port()}"

    def environment(self) -> dict[str, str]:
        root = self.directory
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(root / "home"),
            "XDG_CONFIG_HOME": str(root / "config"),
            "XDG_DATA_HOME": str(root / "data"),
            "XDG_RUNTIME_DIR": str(root / "run"),
            "TMPDIR": str(root / "tmp"),
            "CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "REGISTRY_AUTH_FILE": str(self.auth_file),
            # Go reads either spelling; both are set so neither can leak in from elsewhere.
            # Loopback is never proxied, so the mirror is reached directly.
            "HTTPS_PROXY": self.proxy, "https_proxy": self.proxy,
            "HTTP_PROXY": self.proxy, "http_proxy": self.proxy,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }

    async def run(self, *args: str, stdin: bytes | None = None, timeout: float = 60) -> Result:
        """`podman ARGS...` with this directory's configuration; killed past `timeout`."""
        root = self.directory
        proc = await asyncio.create_subprocess_exec(
            *PRIVATE_VAR_LIB, str(root / "var-lib"),
            BINARY, "--cgroup-manager=cgroupfs", "--events-backend=file",
            f"--tmpdir={root / 'tmp'}", f"--network-config-dir={root / 'networks'}",
            f"--volumepath={root / 'volumes'}", *args,
            env=self.environment(), cwd=root,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            proc.kill()  # this PID only; podman runs no daemon of its own for these commands
            await proc.wait()
            raise AssertionError(f"podman {' '.join(args)} took more than {timeout} s") from None
        return Result(args, proc.returncode or 0, out.decode(errors="replace"),
                      err.decode(errors="replace"))

    async def inspect(self, reference: str) -> dict:
        """`podman image inspect` of one image."""
        result = (await self.run("image", "inspect", reference)).check()
        (image,) = json.loads(result.stdout)
        return image

    async def images(self) -> list[dict]:
        return json.loads((await self.run("images", "--format", "json")).check().stdout)

    def layer_files(self, relative: str) -> list[bytes]:
        """The bytes of `relative` in every vfs layer directory that has it (each layer
        directory is a full root filesystem up to that layer)."""
        return [path.read_bytes()
                for path in sorted((self.graphroot / "vfs" / "dir").glob(f"*/{relative}"))]

    def mounts(self) -> list[str]:
        """Mount points under this directory (from /proc/self/mountinfo)."""
        prefix = str(self.directory.resolve())
        points = []
        with open("/proc/self/mountinfo") as info:
            for line in info:
                # Field 5 is the mount point, with spaces and the like octal-escaped.
                point = line.split()[4].encode().decode("unicode_escape")
                if point == prefix or point.startswith(prefix + "/"):
                    points.append(point)
        return points

    def close(self) -> list[str]:
        """Unmount what podman left under the directory, remove it; returns those mounts."""
        left = self.mounts()
        for point in sorted(left, reverse=True):  # the deepest first
            subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30,
                           check=False)
        shutil.rmtree(self.directory, ignore_errors=True)
        return left
