#!/usr/bin/env bash
# GPU readiness benchmark (bench/gpu.py): StarDist and Noise2Void training throughput (float32 and
# bf16 autocast) and polygon NMS on the GPU against the CPU. Prints one JSON object; on a machine
# without a CUDA GPU it says so and exits 0. About 5 minutes on one recent GPU.
#   bash bench/gpu.sh [--quick]
# Python: $BIOFLOW_PYTHON, else the project's .venv, else python3 (it needs bioflow with a CUDA torch).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${BIOFLOW_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
if ! "$PY" -c 'import torch, bioflow' 2>/dev/null; then
  echo '{"benchmark": "gpu", "cuda": false, "message": "no Python with torch and bioflow found (set BIOFLOW_PYTHON or run scripts/setup.sh)"}'
  exit 0
fi
cd "$ROOT"
exec timeout 470 "$PY" bench/gpu.py "$@"
