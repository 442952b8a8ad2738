"""Models rebuilt from their checkpoints: a checkpoint file or the best checkpoint of an MLflow run.

The checkpoint names every component with its distribution and version, so a missing plugin is
named with the package to install; only the components prediction needs must be installed to
predict (:data:`INFERENCE_KINDS`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bioflow.checkpoint import BEST_CHECKPOINT_ARTIFACT, RUN_ID, load_checkpoint
from bioflow.errors import BioflowError, RegistryError


#: Component kinds a model needs to predict (training-only ones, such as the loss, may be missing).
INFERENCE_KINDS = ("tasks", "models", "postprocessors")


def check_plugins_available(checkpoint: dict[str, Any], origin: str, kinds: tuple[str, ...] | None = None) -> None:
    """Raise a one-line error naming the distribution to install when a component is missing.

    ``kinds`` limits the check to components of those kinds (default: all).
    """
    from bioflow.registry import RENAMED_KINDS, SINGULAR, registry

    for path, comp in checkpoint["bioflow"]["components"].items():
        kind = RENAMED_KINDS.get(comp["kind"], comp["kind"])  # checkpoints name the kinds of their time
        if kinds is not None and kind not in kinds:
            continue
        try:
            registry.resolve(kind, comp["qualified_name"])
        except RegistryError:
            raise BioflowError(
                f"{origin}: the model needs {SINGULAR[kind]} "
                f"'{comp['name']}' ({path}) from distribution '{comp['distribution']}' {comp['version']}, "
                f"which is not installed; install it with: pip install '{comp['distribution']}=={comp['version']}'"
            ) from None


def task_from_checkpoint(checkpoint: dict[str, Any], origin: str, inference: bool = False):
    """Rebuild the task (network and all) from a loaded checkpoint and load its weights.

    With ``inference`` only what prediction needs is built (no loss, no training transforms), so
    a model predicts even where a training-only plugin is not installed.
    """
    from bioflow.tasks import create_task, get_task

    check_plugins_available(checkpoint, origin, INFERENCE_KINDS if inference else None)
    hparams = checkpoint["hyper_parameters"]
    config = hparams["config"]
    task_cls = get_task(config["task"]["name"])
    # Settings a task gained after the model was saved take the values the model was built with.
    missing = {k: v for k, v in task_cls.legacy_settings.items() if k not in config["task"]}
    if missing:
        config = {**config, "task": {**config["task"], **missing}}
    task = create_task(config, hparams["data_info"], inference=inference)
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
    store: Any = None


@dataclass
class Fetched:
    """A checkpoint read from a file or a run, and where it came from."""

    checkpoint: dict[str, Any]
    origin: str  # how messages name it
    run_id: str | None  # the run it was fetched from (None for a file)
    store: Any  # the store that run was found in


def fetch_checkpoint(model: str, store, explicit_store: bool = True) -> Fetched:
    """The checkpoint named by ``model``: a file, or an MLflow run id whose ``checkpoints/best.ckpt``
    is fetched from ``store`` or, unless ``explicit_store``, from whichever store bioflow trained it
    into (see :func:`bioflow.tracking.store.find_run`). Read safely (weights only)."""
    from bioflow.tracking.store import find_run

    if Path(model).is_file():
        return Fetched(load_checkpoint(model), model, None, store)
    if not RUN_ID.match(model):
        raise BioflowError(f"{model}: neither a checkpoint file nor an MLflow run id")
    store = find_run(model, store, explicit_store)
    origin = f"run {model} ({BEST_CHECKPOINT_ARTIFACT})"
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = load_checkpoint(_download_checkpoint(model, store, Path(tmp)), origin)
    return Fetched(checkpoint, origin, model, store)


def load_model(model: str, store, inference: bool = False, explicit_store: bool = True) -> LoadedModel:
    """Rebuild the model named by ``model`` (see :func:`fetch_checkpoint`).

    The returned task is in eval mode on the CPU; ``run_id`` is the run the model was trained in
    (recorded in the checkpoint) when known, and ``store`` the store it was found in.
    ``inference``: see :func:`task_from_checkpoint`.
    """
    fetched = fetch_checkpoint(model, store, explicit_store)
    task = task_from_checkpoint(fetched.checkpoint, fetched.origin, inference=inference)
    run_id = fetched.run_id or fetched.checkpoint["bioflow"].get("run_id")
    return LoadedModel(task, fetched.checkpoint, run_id, model, fetched.store)


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
