#!/usr/bin/env bash
# Run the mirror on its embedded defaults (or pass arguments: scripts/serve.sh --config conf/mirror.toml).
# Creates .venv and installs mirror into it the first time (python3-venv when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/mirror --help >/dev/null 2>&1 || .venv/bin/python -m pip install -q --disable-pip-version-check -e .
exec .venv/bin/mirror serve "$@"
