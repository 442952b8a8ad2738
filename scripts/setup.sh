#!/usr/bin/env bash
# Set up (or reuse) bioflow's virtual environment: .venv in the repository, CPU PyTorch by default,
# bioflow installed in editable mode. Idempotent: a second call with unchanged packaging files does
# nothing. Usage: scripts/setup.sh [extra ...]   (extras of pyproject.toml, e.g. "test")
#
# Environment:
#   PYTHON         interpreter used to create the environment (default: python3; needs >= 3.10)
#   BIOFLOW_VENV   where the environment lives (default: <repo>/.venv)
#   BIOFLOW_TORCH  pip requirement(s) for PyTorch (default: torch==2.13.0, which this project's CPU
#                  machines install from their local wheel). For a CUDA build, for example:
#                  BIOFLOW_TORCH="torch --index-url https://download.pytorch.org/whl/cu126"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BIOFLOW_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${BIOFLOW_TORCH:-torch==2.13.0}"
EXTRAS="$(IFS=,; echo "$*")"

fingerprint() {
  {
    cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh"
    find "$ROOT/plugins" -name pyproject.toml -print0 2>/dev/null | sort -z | xargs -0 -r cat
    echo "$TORCH_SPEC|$EXTRAS"
  } | sha256sum | cut -d' ' -f1
}

STAMP="$VENV/.bioflow-setup"
WANT="$(fingerprint)"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "setup: bioflow needs Python >= 3.10; set PYTHON to such an interpreter" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
echo "setup: installing PyTorch ($TORCH_SPEC) into $VENV" >&2
# shellcheck disable=SC2086  # BIOFLOW_TORCH may carry pip options such as --index-url
"${PIP[@]}" $TORCH_SPEC
echo "setup: installing bioflow${EXTRAS:+ [$EXTRAS]}" >&2
"${PIP[@]}" -e "$ROOT${EXTRAS:+[$EXTRAS]}"
for plugin in "$ROOT"/plugins/*/; do
  [ -f "$plugin/pyproject.toml" ] && "${PIP[@]}" -e "$plugin"
done
echo "$WANT" > "$STAMP"
