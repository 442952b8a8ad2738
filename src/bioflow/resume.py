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
    config = load_checkpoint(checkpoint)["hyper_parameters"]["config"]
    return ResumePoint(run.info.run_id, checkpoint, Path(output), dict(config))
