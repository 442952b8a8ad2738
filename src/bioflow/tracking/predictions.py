"""Every prediction job recorded in MLflow, linked to the run that trained its model.

A job becomes a run of the experiment ``predictions`` of the store the model was trained in: its
parameters are the model, the model's training run, the input and output folders and the options;
its metrics the number of images and pixels, the seconds and the throughput; its artifact
``outputs.csv`` lists every input with the files made from it. The run's description links to the
training run, and the training run gets the tag ``bioflow.predictions`` (how many jobs used it),
so "which model made this file" is answered from the dashboard in both directions. OME-Zarr
outputs also carry the prediction run's id in their attributes.
"""

from __future__ import annotations

import csv
import logging
import platform
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

#: The experiment prediction jobs are recorded in.
EXPERIMENT = "predictions"
KIND_TAG = "bioflow.kind"
MODEL_RUN_TAG = "bioflow.model_run_id"
COUNT_TAG = "bioflow.predictions"


#: Said after a job that no store could record.
NOT_RECORDED = ("this prediction is not recorded in MLflow (no store holds the model's training run; give "
                "--project-dir or --tracking-uri to record it, or --no-record)")


class PredictionRecord:
    """The MLflow run of one prediction job (started by the job's first process)."""

    def __init__(self, store, run_id: str, model_run_id: str | None) -> None:
        self.store = store
        self.run_id = run_id
        self.model_run_id = model_run_id

    @classmethod
    def start(cls, store, model: str, model_run_id: str | None, out_dir: Path, inputs: Sequence[str],
              options: Mapping[str, Any], world: int) -> "PredictionRecord | None":
        """A new run for the job, or None (with a warning) if the store cannot take it."""
        import datetime

        from mlflow.tracking import MlflowClient

        from bioflow.version import __version__

        try:
            client = MlflowClient(store.tracking_uri)
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=store.artifact_location)
                except Exception:  # another job created it meanwhile
                    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
            else:
                experiment_id = experiment.experiment_id
            tags = {KIND_TAG: "prediction", "mlflow.note.content": _description(store, client, model, model_run_id)}
            if model_run_id:
                tags[MODEL_RUN_TAG] = model_run_id
            run = client.create_run(experiment_id, run_name=f"predict-{datetime.datetime.now():%Y%m%d-%H%M%S}",
                                    tags=tags)
            import torch

            params = {
                "model": model, "model_run_id": model_run_id or "", "out": str(out_dir),
                "inputs": " ".join(inputs)[:480], "processes": world, "bioflow_version": __version__,
                "torch_version": torch.__version__, "python": platform.python_version(), "host": platform.node(),
                **{f"predict.{k}": v for k, v in options.items()},
            }
            for key, value in params.items():
                client.log_param(run.info.run_id, key, "" if value is None else str(value)[:500])
            return cls(store, run.info.run_id, model_run_id)
        except Exception as exc:  # the prediction itself must not fail for its record
            log.warning("this prediction is not recorded in %s (%s: %s)", store.tracking_uri, type(exc).__name__,
                        " ".join(str(exc).split())[:160])
            return None

    def finish(self, rows: Sequence[Mapping[str, Any]], pixels: int, seconds: float, failed: int) -> None:
        """Log what the job did (``rows``: input, outputs, fit per input) and close the run."""
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(self.store.tracking_uri)
            run_id = self.run_id
            for key, value in {"images": len(rows), "failed": failed, "pixels": pixels, "seconds": seconds,
                               "pixels_per_second": pixels / seconds if seconds > 0 else 0.0}.items():
                client.log_metric(run_id, key, float(value))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "outputs.csv"
                with open(path, "w", newline="", encoding="utf-8") as fh:
                    writer = csv.DictWriter(fh, ["input", "outputs", "status"], lineterminator="\n")
                    writer.writeheader()
                    writer.writerows(rows)
                client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
            if self.model_run_id:
                try:
                    used = client.get_run(self.model_run_id).data.tags.get(COUNT_TAG, "0")
                    client.set_tag(self.model_run_id, COUNT_TAG, str(int(used) + 1 if used.isdigit() else 1))
                except Exception:
                    pass
        except Exception as exc:
            log.warning("the record of this prediction (run %s) is incomplete (%s: %s)", self.run_id,
                        type(exc).__name__, " ".join(str(exc).split())[:160])


    def fail(self) -> None:
        """Close the run as failed (the job stopped with an error)."""
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(self.store.tracking_uri).set_terminated(self.run_id, "FAILED")
        except Exception:
            pass


def _description(store, client, model: str, model_run_id: str | None) -> str:
    """The run's description: what made it, with a link to the training run where it is in this store."""
    lines = [f"Prediction with `{model}`."]
    if model_run_id:
        try:
            trained = client.get_run(model_run_id)
            lines.append(f"Model trained in run [{trained.info.run_name or model_run_id}]"
                         f"(#/experiments/{trained.info.experiment_id}/runs/{model_run_id}).")
        except Exception:
            lines.append(f"Model trained in run `{model_run_id}` (not in this store).")
    return "\n\n".join(lines)


def record_store(store, explicit: bool, model_store, model_run_id: str | None):
    """Where a job is recorded: the store its model's run was found in, else the store named on
    the command line, else the store of the model's training run among the known ones; None if
    there is no such store (nothing is created just to record a prediction)."""
    from bioflow.tracking.store import find_run

    if model_store is not None and model_store.exists:
        return model_store
    if explicit:
        return store if store.exists else None
    if model_run_id:
        try:
            return find_run(model_run_id, store, explicit=False)
        except Exception:
            return None
    return None


def start_record(store, explicit: bool, loaded, model: str, out_dir: Path, inputs, opts, world: int):
    """The MLflow run of this job, or None where there is no store to record it in (see
    :func:`record_store`; :data:`NOT_RECORDED` says so once the job is done)."""
    import dataclasses

    where = record_store(store, explicit, loaded.store, loaded.run_id)
    if where is None:
        return None
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("progress",)}
    return PredictionRecord.start(where, model, loaded.run_id, out_dir, [str(i) for i in inputs], options, world)
