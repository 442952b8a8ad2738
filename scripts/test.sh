#!/usr/bin/env bash
# Set everything up (first call only) and run the test suite, then the tests of every plugin
# package under plugins/ (each with its own pytest configuration). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" test
VENV="${BIOFLOW_VENV:-$ROOT/.venv}"
cd "$ROOT"
status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
for plugin in "$ROOT"/plugins/*/; do
  if [ -d "$plugin/tests" ]; then
    (cd "$plugin" && "$VENV/bin/python" -m pytest "$@") || status=$?
  fi
done
exit "$status"
