#!/usr/bin/env bash
# The benchmark in one command: installs what is missing, then runs bench/run.py.
#   - Debian packages: wrk and ab (apache2-utils) as load generators, nginx-light (the
#     ceiling for warm blobs), docker-registry (upstream and reference), curl.
#   - Python: the repo's .venv, else /tmp/venv, else a new .venv with the test extras
#     (tests.support needs them); $PYTHON overrides.
# Arguments go to run.py: bench/run.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v ab >/dev/null || need+=(apache2-utils)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v curl >/dev/null || need+=(curl)
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
"$py" -c 'import mirror, cryptography, aiohttp' 2>/dev/null \
  || "$py" -m pip install -q --disable-pip-version-check -e '.[test]'
exec "$py" bench/run.py "$@"
