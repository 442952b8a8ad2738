"""Running the reference StarDist package (never a dependency) from the tests, when it is installed.

The reference lives in a separate interpreter: ``$BIOFLOW_STARDIST_REFERENCE`` or, by default,
``~/.cache/stardist-ref/bin/python``. Tests that use it are skipped when neither exists; the same
behaviour is always also tested against hand-computed cases.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest


def reference_python() -> str | None:
    """Path of the reference interpreter, or None."""
    configured = os.environ.get("BIOFLOW_STARDIST_REFERENCE")
    candidate = Path(configured) if configured else Path.home() / ".cache/stardist-ref/bin/python"
    return str(candidate) if candidate.is_file() else None


def run_reference(code: str, **arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Run ``code`` in the reference interpreter (skipping the test without one).

    The code sees the arrays as ``inputs[name]`` and stores its results in the dict ``outputs``.
    """
    python = reference_python()
    if python is None:
        pytest.skip("reference stardist package not installed")
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(source, **arrays)
        script = (
            "import sys\nimport numpy as np\n"
            f"inputs = dict(np.load({str(source)!r}))\noutputs = {{}}\n"
            + textwrap.dedent(code)
            + f"\nnp.savez({str(target)!r}, **outputs)\n"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        completed = subprocess.run([python, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        if completed.returncode != 0:
            raise RuntimeError(f"reference script failed:\n{completed.stderr[-3000:]}")
        return dict(np.load(target))
