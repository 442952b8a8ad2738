"""Checkpoints: safe loading, and rebuilding a model from its checkpoint alone.

A bioflow checkpoint holds, besides the weights, the resolved config (``hyper_parameters``) and a
``bioflow`` entry with the component names, their arguments, and the distributions and versions
that provided them. Loading never runs code from the file: ``torch.load(..., weights_only=True)``
accepts tensors and plain containers only, so a file crafted to execute code on load is refused.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bioflow.errors import BioflowError, RegistryError

#: Where a training run keeps its model in MLflow.
BEST_CHECKPOINT_ARTIFACT = "checkpoints/best.ckpt"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")

MODEL_KEYS = ("state_dict", "hyper_parameters", "bioflow", "epoch", "global_step", "pytorch-lightning_version")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file safely (weights only); a one-line error if it cannot be used."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise BioflowError(f"{path}: checkpoint file not found")
    if not zipfile.is_zipfile(path):
        raise BioflowError(f"{path}: not a readable checkpoint (not a file written by torch.save)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        offending = [ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln]
        if offending:
            raise BioflowError(
                f"{path}: refused to load: the file holds Python objects that would run code when loaded "
                f"({offending[0]}); bioflow loads only weights and plain data"
            ) from exc
        raise BioflowError(f"{path}: not a readable checkpoint ({' '.join(str(exc).split())[-160:]})") from exc
    except Exception as exc:
        raise BioflowError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "bioflow" not in checkpoint:
        raise BioflowError(f"{path}: not a bioflow checkpoint (no weights or no bioflow metadata)")
    return checkpoint


def save_model_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Write the model part of a training checkpoint (no optimizer or loop state) to ``target``."""
    import torch

    checkpoint = load_checkpoint(source)
    torch.save({k: checkpoint[k] for k in MODEL_KEYS if k in checkpoint}, target)


def check_plugins_available(checkpoint: dict[str, Any], origin: str) -> None:
    """Raise a one-line error naming the distribution to install when a component is missing."""
    from bioflow.registry import SINGULAR, registry

    for path, comp in checkpoint["bioflow"]["components"].items():
        try:
            registry.resolve(comp["kind"], comp["qualified_name"])
        except RegistryError:
            raise BioflowError(
                f"{origin}: the model needs {SINGULAR[comp['kind']]} "
                f"'{comp['name']}' ({path}) from distribution '{comp['distribution']}' {comp['version']}, "
                f"which is not installed; install it with: pip install '{comp['distribution']}=={comp['version']}'"
            ) from None


def task_from_checkpoint(checkpoint: dict[str, Any], origin: str):
    """Rebuild the task (network and all) from a loaded checkpoint and load its weights."""
    from bioflow.tasks import get_task

    check_plugins_available(checkpoint, origin)
    hparams = checkpoint["hyper_parameters"]
    config = hparams["config"]
    task_cls = get_task(config["task"]["name"])
    # Settings a task gained after the model was saved take the values the model was built with.
    missing = {k: v for k, v in task_cls.legacy_settings.items() if k not in config["task"]}
    if missing:
        config = {**config, "task": {**config["task"], **missing}}
    task = task_cls(config, hparams["data_info"])
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    return task


@dataclass
class LoadedModel:
    """A model rebuilt from its checkpoint, with where it came from."""

    task: Any
    checkpoint: dict[str, Any]
    run_id: str | None
    origin: str


def load_model(model: str, store) -> LoadedModel:
    """Rebuild the model named by ``model``: a checkpoint file, or an MLflow run id in ``store``.

    A run id fetches the run's ``checkpoints/best.ckpt``. The returned task is in eval mode on the
    CPU; ``run_id`` is the run the model was trained in (recorded in the checkpoint) when known.
    """
    path = Path(model)
    with tempfile.TemporaryDirectory() as tmp:
        run_id = None
        if not path.is_file():
            if not _RUN_ID.match(model):
                raise BioflowError(f"{model}: neither a checkpoint file nor an MLflow run id")
            path, run_id = _download_checkpoint(model, store, Path(tmp)), model
        checkpoint = load_checkpoint(path)
        task = task_from_checkpoint(checkpoint, model)
    return LoadedModel(task, checkpoint, run_id or checkpoint["bioflow"].get("run_id"), model)


def _download_checkpoint(run_id: str, store, workdir: Path) -> Path:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.tracking_uri)
    try:
        client.get_run(run_id)
        return Path(client.download_artifacts(run_id, BEST_CHECKPOINT_ARTIFACT, str(workdir)))
    except MlflowException as exc:
        raise BioflowError(
            f"run {run_id} in {store.tracking_uri}: cannot get its checkpoint ({exc.message.splitlines()[0]})"
        ) from exc
    except OSError as exc:
        raise BioflowError(f"run {run_id}: its checkpoint artifact {BEST_CHECKPOINT_ARTIFACT} is missing ({exc})") from exc
