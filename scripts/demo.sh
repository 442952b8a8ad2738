#!/usr/bin/env bash
# Set everything up (first call only) and run the demo: U-Net segmentation of synthetic nuclei,
# trained, then tested on the held-out test split, tracked in the embedded MLflow store under
# ./bioflow-runs. Extra arguments are Hydra overrides, e.g. scripts/demo.sh trainer.max_epochs=3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${BIOFLOW_VENV:-$ROOT/.venv}"
exec "$VENV/bin/bioflow" train experiment=demo_unet "$@"
