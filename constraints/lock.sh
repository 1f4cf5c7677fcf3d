#!/usr/bin/env bash
# Refresh constraints/lock.txt, the exact versions the container image installs: a clean
# Python 3.11 venv (the image's Python) gets mirror's runtime dependencies (no test extras)
# and the newest setuptools, and `pip freeze` of it becomes the file, below its header.
# Run it after a change to pyproject's dependencies, or to take new releases, and commit
# the result with the change. PYTHON=python3.11 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3.11}"
"$py" -c 'import sys; assert sys.version_info[:2] == (3, 11), "the image runs Python 3.11"'

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Build from a copy of what the Dockerfile copies, so no build/ appears in the checkout.
mkdir "$tmp/src"
cp -r pyproject.toml README.md mirror "$tmp/src/"
"$py" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install "$tmp/src"
"${pip[@]}" install -U setuptools
{
  sed -n '1,/^# ---$/p' constraints/lock.txt
  "${pip[@]}" freeze --all --exclude mirror --exclude pip
} >"$tmp/lock.txt"
mv "$tmp/lock.txt" constraints/lock.txt
echo "constraints/lock.txt: $(grep -vc '^#' constraints/lock.txt) packages"
