"""``bioflow evaluate``: metrics of a trained model on a split of its data, logged into its run."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from bioflow.errors import BioflowError
from bioflow.tracking.store import Store, default_project_dir

def evaluate(
    model: str,
    project_dir: str | None = None,
    tracking_uri: str | None = None,
    split: str = "test",
    log_to_run: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint (or a run's best checkpoint) on the recorded ``split`` of its data."""
    import lightning as L

    from bioflow.loading import load_model, recorded_data

    explicit = project_dir is not None or tracking_uri is not None
    store = Store.create(project_dir or default_project_dir(), tracking_uri).check_intact()
    loaded = load_model(model, store, explicit_store=explicit, require_task=True)
    store = loaded.store or store
    # A package's scores are its own: they are not logged into the run it was trained in.
    task, run_id = loaded.task, (loaded.run_id if loaded.package is None else None)
    data = recorded_data(loaded.config, task)
    if not data.splits[split]:
        raise BioflowError(f"{model}: the {split} split of this model's data is empty")
    data.evaluation_split = split
    trainer = L.Trainer(
        accelerator="auto", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )
    task.fit_verdicts = {}  # filled as the test predicts each image (the fit check rides along)
    try:
        results = trainer.test(task, datamodule=data, verbose=False)
        verdicts = task.fit_verdicts
    finally:
        task.fit_verdicts = None
    prefix = "test/" if split == "test" else f"eval_{split}/"
    metrics = {prefix + k.split("/", 1)[1]: float(v) for k, v in (results[0] if results else {}).items()}
    metrics.update({prefix + k: v for k, v in fit_scores(task, data.splits[split], verdicts).items()})
    logged = False
    if log_to_run and run_id is not None:
        logged = _log_to_run(store, run_id, metrics, split, task)
    return {"model": model, "split": split, "n_images": len(data.splits[split]), "metrics": metrics,
            "run_id": run_id, "logged": logged, "tracking_uri": store.tracking_uri}


def fit_scores(task, records, seen: Mapping[str, Any] | None = None) -> dict[str, float]:
    """How the split's images fit the model's training data: mean score and fraction flagged.
    ``seen``: verdicts by image name from the test's own predictions; other images are predicted
    for the check (tasks whose evaluation never predicts the image as it is)."""
    import numpy as np

    from bioflow.inference.fit import fit_verdict

    seen = seen or {}
    verdicts = [v for v in (seen[r.name] if r.name in seen else fit_verdict(task, r.image) for r in records)
                if v is not None]
    if not verdicts:
        return {}
    return {"fit_score_mean": float(np.mean([v["score"] for v in verdicts])),
            "fit_flagged_fraction": float(np.mean([not v["fits"] for v in verdicts]))}


def _log_to_run(store: Store, run_id: str, metrics: Mapping[str, float], split: str, task) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        print(f"bioflow: run {run_id} is not in {store.tracking_uri}; metrics not logged", file=sys.stderr)
        return False
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / f"{split}_metrics.json"
        target.write_text(json.dumps(metrics, indent=1, sort_keys=True))
        client.log_artifact(run_id, str(target), "evaluation")
        for figure in task.report_figures(metrics, tmp):
            client.log_artifact(run_id, str(figure), "evaluation")
    return True


def print_evaluation(result: Mapping[str, Any]) -> None:
    print(f"bioflow: {result['split']} split of {result['model']} ({result['n_images']} images)")
    for key, value in sorted(result["metrics"].items()):
        print(f"  {key} = {value:.4f}")
    if result["logged"]:
        print(f"  logged into MLflow run {result['run_id']} ({result['tracking_uri']})")
