#!/usr/bin/env bash
# Set everything up (first call only) and run the test suite, then the tests of every plugin
# package under plugins/ (each with its own pytest configuration). Extra arguments go to pytest.
#
# The napari widgets' tests need a display: without one, the tests run under Xvfb (installed
# from Debian's packages when this runs as root and it is missing; otherwise those tests skip).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" test napari-test
VENV="${BIOFLOW_VENV:-$ROOT/.venv}"
cd "$ROOT"

DISPLAY_WRAP=()
if [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
  if ! command -v xvfb-run >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing Xvfb for the napari widget tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
       xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-randr0 libxcb-render-util0 \
       libxcb-image0 libxcb-shape0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-cursor0 libgl1 libegl1 libfontconfig1 libdbus-1-3 \
       >/dev/null) || echo "test: could not install Xvfb; the napari widget tests will skip" >&2
  fi
  if command -v xvfb-run >/dev/null 2>&1; then
    DISPLAY_WRAP=(xvfb-run -a -s "-screen 0 1280x1024x24")
  fi
fi
# napari keeps its settings here rather than in the user's home
export NAPARI_CONFIG="${NAPARI_CONFIG:-$(mktemp -d)/napari-settings.yaml}"

status=0
"${DISPLAY_WRAP[@]}" "$VENV/bin/python" -m pytest "$@" || status=$?
for plugin in "$ROOT"/plugins/*/; do
  if [ -d "$plugin/tests" ]; then
    (cd "$plugin" && "$VENV/bin/python" -m pytest "$@") || status=$?
  fi
done
exit "$status"
