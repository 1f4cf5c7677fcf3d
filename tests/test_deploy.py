"""deploy/systemd/mirror.service: systemd accepts it without a warning, its hardening scores
as systemd rates it, and the command it runs, with its environment and the shipped config,
serves pulls and logins under the restrictions the unit imposes that a process can impose
on itself: no new privileges, no writable-and-executable memory, its system-call filter.

`systemd-analyze verify` needs ExecStart's binary to exist (it fails with "Command ... is not
executable" otherwise) and exits 0 on an unknown key, printing only a warning: so the unit
is verified as a copy with this venv's `mirror` in place of /opt/mirror/bin/mirror, and the
test asserts that nothing at all was printed. No systemd runs here (PID 1 is not systemd),
so the unit is not started. Its MemoryDenyWriteExecute=yes is reproduced with the kernel's
own PR_SET_MDWE, which refuses writable-and-executable mappings the same way; its
SystemCallFilter= with libseccomp (the library systemd uses), from the system calls
`systemd-analyze syscall-filter` lists for each group, other calls failing with EPERM
as SystemCallErrorNumber=EPERM says.
"""

from __future__ import annotations

import base64
import ctypes
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from tests.support import missing
from tests.test_serve import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy/systemd/mirror.service"
SHIPPED_BINARY = "/opt/mirror/bin/mirror"
SHIPPED_CONFIG = "/etc/mirror/mirror.toml"
ANALYZE = shutil.which("systemd-analyze")
MANIFEST_TYPES = ("application/vnd.docker.distribution.manifest.v2+json, "
                  "application/vnd.oci.image.manifest.v1+json")



@pytest.fixture
def needs_analyze():
    if ANALYZE is None:
        missing("systemd-analyze is not installed")



def service_settings(text: str) -> dict[str, list[str]]:
    """The [Service] section's settings, every value of a key repeated (systemd allows it)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def installed_copy(tmp_path: Path) -> Path:
    """The unit with this venv's `mirror` where the shipped one would be installed."""
    binary = Path(sys.executable).with_name("mirror")
    assert binary.is_file(), f"{binary}: the package's console script is not installed"
    text = UNIT.read_text()
    assert text.count(SHIPPED_BINARY) == 1
    copy = tmp_path / "mirror.service"
    copy.write_text(text.replace(SHIPPED_BINARY, str(binary)))
    return copy


@pytest.mark.usefixtures("needs_analyze")
def test_unit_verifies_without_a_single_warning(tmp_path):
    done = subprocess.run([ANALYZE, "verify", "--man=no", str(installed_copy(tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.usefixtures("needs_analyze")
def test_verify_would_catch_a_typo_and_a_missing_binary(tmp_path):
    """The test above can fail: verify prints what is wrong with a unit like this one."""
    typo = tmp_path / "typo.service"
    typo.write_text(installed_copy(tmp_path).read_text().replace("ProtectHome=", "ProtectHom="))
    done = subprocess.run([ANALYZE, "verify", "--man=no", str(typo)], capture_output=True,
                          text=True, timeout=60)
    assert "Unknown key 'ProtectHom'" in done.stderr
    missing = tmp_path / "missing.service"
    missing.write_text(UNIT.read_text())  # /opt/mirror/bin/mirror is not here
    done = subprocess.run([ANALYZE, "verify", "--man=no", str(missing)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and f"Command {SHIPPED_BINARY} is not executable" in done.stderr


@pytest.mark.usefixtures("needs_analyze")
def test_unit_exposure_is_low_by_systemd_analyze_security(tmp_path):
    done = subprocess.run([ANALYZE, "security", "--offline=true", "--threshold=20",
                           str(installed_copy(tmp_path))], capture_output=True, text=True,
                          timeout=60)
    if "--offline" in done.stderr and "unrecognized" in done.stderr:
        missing("this systemd-analyze has no --offline")
    found = re.search(r"Overall exposure level for mirror\.service: (\d+\.\d+) (\w+)",
                      done.stdout)
    assert found, done.stdout + done.stderr
    # 0 is fully locked down, 10 is no hardening at all; measured 1.1 with systemd 252. What
    # is left: the network (a registry needs it) and the host's root directory.
    assert float(found.group(1)) <= 1.5 and found.group(2) == "OK", done.stdout
    assert done.returncode == 0


def test_unit_runs_the_real_cli_with_its_data_in_the_state_directory():
    settings = service_settings(UNIT.read_text())
    assert settings["ExecStart"] == [f"{SHIPPED_BINARY} serve --config {SHIPPED_CONFIG}"]
    assert settings["StateDirectory"] == ["mirror"]
    assert "MIRROR_STORAGE_ROOT=%S/mirror" in settings["Environment"]
    assert settings["DynamicUser"] == ["yes"] and settings["ProtectSystem"] == ["strict"]
    assert settings["CapabilityBoundingSet"] == [""]  # port 5000 needs no capability


PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 1
SCMP_ACT_ALLOW, SCMP_ACT_ERRNO = 0x7FFF0000, 0x00050000
MDWE_WRAPPER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE): " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""
# argv: the allowed system calls (comma-separated), then the command. EPERM for the rest.
HARDENED_WRAPPER = f"""
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for option, value in (({PR_SET_NO_NEW_PRIVS}, 1), ({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN})):
    if libc.prctl(option, value, 0, 0, 0) != 0:
        sys.exit(f"prctl({{option}}): " + os.strerror(ctypes.get_errno()))
seccomp = ctypes.CDLL("libseccomp.so.2")
seccomp.seccomp_init.restype = ctypes.c_void_p
ctx = ctypes.c_void_p(seccomp.seccomp_init(ctypes.c_uint32({SCMP_ACT_ERRNO} | errno.EPERM)))
for name in sys.argv[1].split(","):
    number = seccomp.seccomp_syscall_resolve_name(name.encode())
    if number >= 0:  # negative: not a call of this architecture
        assert seccomp.seccomp_rule_add(ctx, ctypes.c_uint32({SCMP_ACT_ALLOW}),
                                        ctypes.c_int(number), ctypes.c_uint(0)) == 0, name
assert seccomp.seccomp_load(ctx) == 0
os.execv(sys.argv[2], sys.argv[2:])
"""


def syscalls(group: str) -> set[str]:
    """The system calls of a systemd group such as @system-service, nested groups expanded."""
    done = subprocess.run([ANALYZE, "syscall-filter", group], capture_output=True, text=True,
                          timeout=30, check=True)
    names: set[str] = set()
    for line in done.stdout.splitlines()[1:]:
        line = line.strip()
        if line.startswith("@"):
            names |= syscalls(line)
        elif line and not line.startswith("#"):
            names.add(line)
    return names


def unit_syscalls(settings: dict[str, list[str]]) -> set[str]:
    """What the unit's SystemCallFilter= lines allow: allow-lists added, ~deny-lists taken
    away, in order, as systemd applies them."""
    allowed: set[str] = set()
    for value in settings["SystemCallFilter"]:
        deny = value.startswith("~")
        names = set().union(*(syscalls(n) if n.startswith("@") else {n}
                              for n in value.removeprefix("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def libseccomp_available() -> bool:
    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return False
    return True


def mdwe_supported() -> bool:
    """Linux 6.3+: PR_SET_MDWE; asked in a child, since it cannot be undone."""
    probe = subprocess.run([sys.executable, "-c", MDWE_WRAPPER, sys.executable, "-c",
                            "import mmap; mmap.mmap(-1, 4096, prot=7)"],
                           capture_output=True, text=True, timeout=30)
    return "prctl" not in probe.stderr and "PermissionError" in probe.stderr


@pytest.mark.usefixtures("needs_analyze")
def test_unit_command_serves_pulls_and_logins_under_its_hardening(tmp_path, upstream):
    if sys.platform != "linux" or not mdwe_supported():
        missing("the kernel has no PR_SET_MDWE")
    if not libseccomp_available():
        missing("libseccomp is not installed")
    settings = service_settings(UNIT.read_text())
    allowed = unit_syscalls(settings)
    assert "sendfile" in allowed and "setrlimit" not in allowed  # @resources is denied
    binary = str(Path(sys.executable).with_name("mirror"))
    argv = settings["ExecStart"][0].replace(SHIPPED_BINARY, binary).replace(
        SHIPPED_CONFIG, str(ROOT / "conf/mirror.toml")).split()
    state = tmp_path / "mirror"  # what StateDirectory=mirror creates: %S/mirror, %S = tmp_path
    state.mkdir()
    (tmp_path / "htpasswd").write_text(
        "alice:" + bcrypt.hashpw(b"wonderland", bcrypt.gensalt(5)).decode() + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    env.update({key: value.replace("%S", str(tmp_path)) for key, _, value in
                (e.partition("=") for e in settings["Environment"])})
    env.update({  # the test's address and upstream, and a login as the unit's drop-in sets
        "MIRROR_SERVER_LISTEN": f"127.0.0.1:{port}",
        "MIRROR_UPSTREAM_DOCKER_IO_URL": upstream.url,
        "MIRROR_ACCESS_HTPASSWD": str(tmp_path / "htpasswd"),
        "MIRROR_ACCESS_ANONYMOUS_PULL": "false",
    })
    proc = subprocess.Popen([sys.executable, "-c", HARDENED_WRAPPER, ",".join(sorted(allowed)),
                             *argv], cwd=state, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    login = "Basic " + base64.b64encode(b"alice:wonderland").decode()
    alpine = upstream.images["library/alpine"]
    try:
        wait_for(f"http://127.0.0.1:{port}/healthz", proc)

        def get(path: str, accept: str = "*/*") -> bytes:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={
                "Authorization": login, "Accept": accept})
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.read()

        started = time.monotonic()
        assert get("/v2/alpine/manifests/3.19", MANIFEST_TYPES) == alpine.manifest
        for digest, data in alpine.blobs.items():
            assert get(f"/v2/library/alpine/blobs/{digest}") == data
        elapsed = time.monotonic() - started
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out  # SIGTERM, as systemctl stop sends, is a clean stop
    assert "Traceback" not in out, out
    assert f"with data in {state.resolve()};" in out, out  # MIRROR_STORAGE_ROOT won
    assert f"logins from {tmp_path / 'htpasswd'}: pull: login required" in out, out
    assert (state / "metadata.sqlite").is_file() and elapsed < 30
