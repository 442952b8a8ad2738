"""One training job = one MLflow run: what is logged into it, and when.

At the start (rank 0 only): the resolved config as flattened params and as ``config.yaml``, the
split as ``split.json``, tags naming each component with its distribution and version, and the git
commit of the working directory. During training: per-epoch metrics (through Lightning) and a PNG
of input / prediction / ground truth for a few validation images (:mod:`bioflow.tracking.figures`). At the end: the best
checkpoint, as ``checkpoints/best.ckpt``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from bioflow.version import __version__
from bioflow.checkpoint import BEST_CHECKPOINT_ARTIFACT, save_model_checkpoint
from bioflow.tracking.store import Store

#: Tags a run carries for resuming: its job folder, its SLURM job, how often it was resumed.
OUTPUT_TAG = "bioflow.output_dir"
SLURM_TAG = "bioflow.slurm_job_id"
RESUMED_TAG = "bioflow.resumed"
#: MLflow 3's experiment tag for the kind of work in an experiment (it picks the UI's view).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: A runs-table view stored with the experiment (MLflow's shared views): bioflow's shows the test
#: scores as columns. Opened by :func:`runs_page`.
RUNS_VIEW_KEY = "bioflow"
_SHARED_VIEW_TAG = "mlflow.sharedViewState."


def runs_page(base_url: str, experiment_id: str) -> str:
    """The dashboard page of an experiment's runs in the model-training view, with bioflow's columns."""
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_KEY}")


@rank_zero_only
def publish_runs_view(logger: MLFlowLogger, metrics: list[str]) -> None:
    """Add ``metrics`` to the columns of the experiment's bioflow runs view (created if needed)."""
    client = logger.experiment
    experiment = client.get_experiment(logger.experiment_id)
    tag = _SHARED_VIEW_TAG + RUNS_VIEW_KEY
    try:
        state = json.loads(experiment.tags.get(tag, "{}"))
    except ValueError:
        state = {}
    columns = list(state.get("selectedColumns") or [])
    for key in metrics:
        column = f"metrics.`{key}`"
        if column not in columns:
            columns.append(column)
    state.update(selectedColumns=columns, orderByKey="attributes.start_time", orderByAsc=False)
    client.set_experiment_tag(logger.experiment_id, tag, json.dumps(state))


class OncePerStepMLFlowLogger(MLFlowLogger):
    """An MLflow logger that never logs a (metric, step) point twice.

    Lightning adds ``epoch`` to every batch of metrics it logs, so without this the same epoch
    value would be stored several times per step; and a resumed run (``resumed=True``) would log
    again the points its interrupted job had already logged.
    """

    def __init__(self, *args: Any, resumed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resumed = resumed
        self._logged: dict[str, set[int]] | None = None

    def _already_logged(self) -> dict[str, set[int]]:
        if self._logged is None:
            self._logged = {}
            if self._resumed:
                client, run_id = self.experiment, self.run_id
                for key in client.get_run(run_id).data.metrics:
                    self._logged[key] = {m.step for m in client.get_metric_history(run_id, key)}
        return self._logged

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None:
            logged = self._already_logged()
            metrics = {k: v for k, v in metrics.items() if step not in logged.get(k, ())}
            for key in metrics:
                logged.setdefault(key, set()).add(step)
            if not metrics:
                return
        super().log_metrics(metrics, step)


def make_logger(logger_cfg: Mapping[str, Any], store: Store, run_id: str | None = None,
                resuming: bool = False) -> MLFlowLogger:
    """Lightning's MLflow logger pointed at ``store`` (a new run, or ``run_id`` to continue one).

    No (metric, step) point is logged twice; a resuming logger also skips the points the run
    already holds.
    """
    tags = {str(k): str(v) for k, v in (logger_cfg.get("tags") or {}).items()}
    run_name = logger_cfg.get("run_name")
    if run_name is None and run_id is None:  # readable in the runs table: what and when
        run_name = f"{logger_cfg['experiment_name']}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    return OncePerStepMLFlowLogger(
        experiment_name=logger_cfg["experiment_name"],
        run_name=run_name,
        tracking_uri=store.tracking_uri,
        artifact_location=store.artifact_location,
        tags=tags,
        run_id=run_id,
        log_model=False,
        resumed=resuming,
    )


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def git_commit(folder: str | os.PathLike) -> str | None:
    """The commit checked out in ``folder`` (with ``-dirty`` for local changes), if it is a git repo."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


@rank_zero_only
def log_run_start(
    logger: MLFlowLogger,
    config: Mapping[str, Any],
    components: Mapping[str, Mapping[str, Any]],
    split: Mapping[str, list[str]],
    run_dir: Path,
) -> None:
    """Params, config and split artifacts, and tags of a new run."""
    import yaml

    client, run_id = logger.experiment, logger.run_id
    logger.log_hyperparams(flatten(config))
    tags = {
        "bioflow.version": __version__,
        "bioflow.task": config["task"]["name"],
        OUTPUT_TAG: str(run_dir),
    }
    for path, comp in components.items():
        tags[f"bioflow.component.{path}"] = comp["qualified_name"]
        tags[f"bioflow.plugin.{comp['distribution']}"] = comp["version"]
    commit = git_commit(os.getcwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("SLURM_JOB_ID"):
        tags[SLURM_TAG] = os.environ["SLURM_JOB_ID"]
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    # MLflow 3 opens experiments of unknown kind in its generative-AI view; these are training runs.
    client.set_experiment_tag(logger.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
        (Path(tmp) / "split.json").write_text(json.dumps(split, indent=1))
        client.log_artifact(run_id, str(Path(tmp) / "config.yaml"))
        client.log_artifact(run_id, str(Path(tmp) / "split.json"))


@rank_zero_only
def mark_resumed(logger: MLFlowLogger) -> None:
    """Count the resumptions of a run in a tag and mark it running again."""
    client, run_id = logger.experiment, logger.run_id
    count = int(client.get_run(run_id).data.tags.get(RESUMED_TAG, "0")) + 1
    client.set_tag(run_id, RESUMED_TAG, str(count))
    client.update_run(run_id, status="RUNNING")


@rank_zero_only
def log_checkpoint(logger: MLFlowLogger, path: str | os.PathLike) -> None:
    """Upload the model of a training checkpoint as the run's ``checkpoints/best.ckpt``.

    Only what prediction and evaluation need is kept (weights and bioflow's metadata, no
    optimizer state), which makes the artifact a fraction of the training checkpoint's size.
    """
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / Path(BEST_CHECKPOINT_ARTIFACT).name
        save_model_checkpoint(path, target)
        logger.experiment.log_artifact(logger.run_id, str(target), str(Path(BEST_CHECKPOINT_ARTIFACT).parent))


class ValidationFigures(Callback):
    """Logs a PNG of a few validation samples to the MLflow run every ``every_n_epochs`` epochs."""

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = max(1, every_n_epochs)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not getattr(pl_module, "figure_samples", None):
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger):
            return
        from bioflow.tracking.figures import render_samples

        epoch = trainer.current_epoch + 1  # as the training log counts: "epoch 3/10"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"val_epoch_{epoch:03d}.png"
            render_samples(pl_module.figure_samples, path, f"validation, epoch {epoch} of {trainer.max_epochs}")
            logger.experiment.log_artifact(logger.run_id, str(path), "figures")
