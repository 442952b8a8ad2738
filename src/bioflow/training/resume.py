"""Resuming interrupted training into the same MLflow run.

``bioflow train resume=<run id>`` (or ``resume=last``, the most recent run of the experiment)
continues a run from the newest checkpoint in its job folder: ``last.ckpt``, written at the end of
every epoch, or an ``hpc_ckpt_*.ckpt`` that Lightning writes when SLURM signals a requeue. The run's
own recorded config is used (the new command line only chooses the run), so the resumed job ends
where an uninterrupted one would. A SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0)
resumes the run of its ``SLURM_JOB_ID`` without being asked.

Metric points that the interrupted job already logged for a step are not logged again (see
``bioflow.tracking.run.OncePerStepMLFlowLogger``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from bioflow.errors import BioflowError
from bioflow.tracking.run import OUTPUT_TAG, SLURM_TAG
from bioflow.tracking.store import Store

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class ResumePoint:
    """Where an interrupted run continues from."""

    run_id: str
    checkpoint: Path
    output_dir: Path
    config: dict[str, Any]
    epochs_done: int = 0
    finished: bool = False


def requested_resume(config: Mapping[str, Any]) -> str | None:
    """The run to resume: the config's ``resume``, or this SLURM job's run after a requeue."""
    if config.get("resume"):
        return str(config["resume"])
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 and os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    return None


def newest_checkpoint(output_dir: Path) -> Path | None:
    """The most recent of ``checkpoints/last.ckpt`` and Lightning's ``hpc_ckpt_*.ckpt`` in a job folder."""
    candidates = list((output_dir / "checkpoints").glob("last*.ckpt")) + list(output_dir.glob("hpc_ckpt_*.ckpt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def find_resume_point(request: str, store: Store, experiment_name: str) -> ResumePoint:
    """Locate the run, its job folder, its newest checkpoint and its recorded config."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from bioflow.checkpoint import load_checkpoint

    if not store.exists:  # never create a store to look for a run in it
        raise BioflowError(f"resume={request}: no MLflow store in {store.project_dir} (project_dir); nothing to resume")
    client = MlflowClient(store.tracking_uri)
    try:
        if _RUN_ID.match(request):
            run = client.get_run(request)
        else:
            if request != "last" and not request.startswith("slurm:"):
                raise BioflowError(f"resume={request}: give a run id, or 'last' for the newest run of the experiment")
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                raise BioflowError(f"resume={request}: no experiment '{experiment_name}' in {store.tracking_uri}")
            query = f"tags.`{SLURM_TAG}` = '{request.split(':', 1)[1]}'" if request.startswith("slurm:") else ""
            runs = client.search_runs([experiment.experiment_id], filter_string=query,
                                      order_by=["attributes.start_time DESC"], max_results=1)
            if not runs:
                raise BioflowError(f"resume={request}: no run to resume in experiment '{experiment_name}'")
            run = runs[0]
    except MlflowException as exc:
        raise BioflowError(f"resume={request}: {exc.message.splitlines()[0]}") from exc
    output = run.data.tags.get(OUTPUT_TAG)
    if not output:
        raise BioflowError(f"resume: run {run.info.run_id} has no recorded job folder ({OUTPUT_TAG}); it cannot be resumed")
    checkpoint = newest_checkpoint(Path(output))
    if checkpoint is None:
        raise BioflowError(
            f"resume: run {run.info.run_id} has no checkpoint in {output} (it stopped before its first epoch "
            "ended); start a new run"
        )
    saved = load_checkpoint(checkpoint)
    return ResumePoint(run.info.run_id, checkpoint, Path(output), dict(saved["hyper_parameters"]["config"]),
                       epochs_done=int(saved.get("epoch", -1)) + 1, finished=run.info.status == "FINISHED")


#: Overrides a resumed run takes: a longer training (its recorded config is kept otherwise).
EXTENDING = ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.enable_progress_bar")
#: Overrides that only say where the run is (and how to find it).
LOCATING = ("resume", "project_dir", "logger.experiment_name", "logger.tracking_uri", "experiment")


def resumed_config(point: ResumePoint, requested: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The run's recorded config with the overrides that can apply to it (more epochs or steps).

    Any other override that would change the recorded config is an error rather than being
    ignored: a resumed run continues as it was configured.
    """
    config = {**point.config, "resume": point.run_id}
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if not key or key.startswith("hydra") or key in LOCATING:
            continue
        new, old = _lookup(requested, key), _lookup(point.config, key)
        if key in EXTENDING:
            config = _assign(config, key, new)
        elif _named(new) != _named(old):
            raise BioflowError(
                f"resume={point.run_id}: {override} would change the run's recorded config ({key}: {_named(old)!r}); "
                "a resumed run continues as configured (only trainer.max_epochs, max_steps or max_time may grow); "
                f"start a new run from its weights with init_from={point.run_id}"
            )
    epochs = config["trainer"].get("max_epochs")
    if point.finished and epochs is not None and epochs <= point.epochs_done:
        raise BioflowError(
            f"resume={point.run_id}: the run finished its {point.epochs_done} epoch(s); to train it further give "
            f"trainer.max_epochs larger than {point.epochs_done}"
        )
    return config


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _named(value: Any) -> Any:
    """A group choice compares by its component name (``model=unet``), a value by itself."""
    return value.get("name", value) if isinstance(value, Mapping) else value


def _assign(config: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    head, _, rest = key.partition(".")
    out = dict(config)
    out[head] = _assign(config.get(head) or {}, rest, value) if rest else value
    return out
