"""One resolver for "which model?": a checkpoint file, an MLflow run id (its best checkpoint) or a
bioimage.io package, used alike by predict, evaluate, export and the Python API (:func:`load_model`).

The checkpoint names every component with its distribution and version, so a missing plugin is
named with the package to install; only the components prediction needs must be installed to
predict (:data:`INFERENCE_KINDS`). A package bioflow wrote is rebuilt as its task around the
package's weights; any other package predicts its own output tensors
(see :mod:`bioflow.bioimageio.runtime`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from bioflow.checkpoint import BEST_CHECKPOINT_ARTIFACT, RUN_ID, load_checkpoint
from bioflow.errors import BioflowError, RegistryError
from bioflow.kinds import inference_kinds


#: Component kinds a model needs to predict (training-only ones, such as the loss, may be missing).
INFERENCE_KINDS = inference_kinds()


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
    from bioflow.tasks import create_task, with_legacy_settings

    check_plugins_available(checkpoint, origin, INFERENCE_KINDS if inference else None)
    hparams = checkpoint["hyper_parameters"]
    task = create_task(with_legacy_settings(hparams["config"]), hparams["data_info"], inference=inference)
    task.load_state_dict(checkpoint["state_dict"])
    task.eval()
    fit = (checkpoint.get("bioflow") or {}).get("fit")
    if fit is not None:  # the training data's fingerprint (bioflow.inference.fit)
        from bioflow.inference.fit import FINGERPRINT_VERSION, FitReference

        if fit.get("version") == FINGERPRINT_VERSION:  # features defined otherwise before: no check
            task.fit_reference = FitReference(fit)
    return task


@dataclass
class LoadedModel:
    """A model ready to predict, with where it came from.

    ``task``: a bioflow task (from a checkpoint, or rebuilt around a package's weights), or the
    package's own tensors for packages bioflow did not write; ``checkpoint``: what the model records
    (config, data info, bioflow's record; None for packages bioflow did not write); ``package``:
    the bioimage.io description when the model is a package.
    """

    task: Any
    checkpoint: dict[str, Any] | None
    run_id: str | None
    origin: str
    store: Any = None
    package: Any = None

    @property
    def config(self) -> dict[str, Any] | None:
        return None if self.checkpoint is None else self.checkpoint["hyper_parameters"]["config"]


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


def load_model(model: str, store, inference: bool = False, explicit_store: bool = True,
               require_task: bool = False) -> LoadedModel:
    """Rebuild the model named by ``model``: a bioimage.io package (a .zip, an rdf.yaml or a folder
    with one), a checkpoint file or an MLflow run id (see :func:`fetch_checkpoint`).

    The returned task is in eval mode on the CPU; ``run_id`` is the run the model was trained in
    (recorded in the checkpoint or package) when known, and ``store`` the store it was found in.
    ``inference``: see :func:`task_from_checkpoint`. ``require_task``: a package must rebuild as a
    bioflow task (evaluation needs its metrics and data), else a one-line error.
    """
    from bioflow.bioimageio.package import is_package

    if is_package(model):
        from bioflow.bioimageio.package import bioflow_section, open_package
        from bioflow.bioimageio.runtime import PackageModel, package_checkpoint, packaged_task

        descr = open_package(model)
        task = packaged_task(descr, model, required=require_task, inference=inference)
        section = bioflow_section(descr)
        checkpoint = package_checkpoint(descr) if task is not None else None
        return LoadedModel(task or PackageModel(descr, model), checkpoint, (section or {}).get("run_id"), model,
                           None, descr)
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


def recorded_data(config: Mapping[str, Any], task):
    """The data module of a model's config with its recorded split and normalisation, prepared."""
    from bioflow.data.module import BioflowDataModule
    from bioflow.tasks import get_task

    task_cls = get_task(config["task"]["name"])
    data = BioflowDataModule(
        config["data"], config["sampler"], seed=config["seed"], target_kind=task_cls.target_kind,
        target_fn=task_cls.target_transform(task.task_settings), split=task.data_info.split,
        normalization=task.data_info.normalization,
    )
    data.read()
    task_cls.settings_from_data(task.task_settings, data.records)  # the targets fit the model (e.g. its classes)
    data.prepare()
    return data
