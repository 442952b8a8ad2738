"""Checkpoint files: reading them safely, and writing the model part of a training checkpoint.

A bioflow checkpoint holds, besides the weights, the resolved config (``hyper_parameters``) and a
``bioflow`` entry with the component names, their arguments, and the distributions and versions
that provided them. Reading never runs code from the file: ``torch.load(..., weights_only=True)``
accepts tensors and plain containers only, so a file crafted to execute code on load is refused.
Rebuilding a model from a checkpoint is :mod:`bioflow.loading`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from bioflow.errors import BioflowError

#: Where a training run keeps its model in MLflow.
BEST_CHECKPOINT_ARTIFACT = "checkpoints/best.ckpt"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")

MODEL_KEYS = ("state_dict", "hyper_parameters", "bioflow", "epoch", "global_step", "pytorch-lightning_version")


def load_checkpoint(path: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
    """Read a checkpoint file safely (weights only); a one-line error if it cannot be used.

    ``name`` is how messages call the file (e.g. the run it came from); default: its path.
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise BioflowError(f"{name}: checkpoint file not found")
    if not zipfile.is_zipfile(path):
        raise BioflowError(f"{name}: not a readable checkpoint (not a file written by torch.save)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        offending = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if offending or "weights_only" in str(exc).lower():
            what = f" ({offending.group(1)})" if offending else ""
            raise BioflowError(
                f"{name}: refused: it holds Python code or objects{what}; bioflow loads weights and plain data only"
            ) from exc
        raise BioflowError(f"{name}: not a readable checkpoint (damaged or not written by bioflow)") from exc
    except Exception as exc:
        raise BioflowError(f"{name}: not a readable checkpoint ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "bioflow" not in checkpoint:
        raise BioflowError(f"{name}: not a bioflow checkpoint (no weights or no bioflow metadata)")
    return checkpoint


def save_model_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Write the model part of a training checkpoint (no optimizer or loop state) to ``target``."""
    import torch

    checkpoint = load_checkpoint(source)
    torch.save({k: checkpoint[k] for k in MODEL_KEYS if k in checkpoint}, target)
