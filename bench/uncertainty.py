"""Probabilistic restoration: what the per-pixel std costs in quality and how well it is calibrated.

For each experiment (the CARE and Noise2Void demos by default), trains the model twice at the same
budget and seed through ``bioflow.train``: as it is, and with ``task.probabilistic=true``. Prints
one JSON object with, per experiment:

- ``psnr`` of both on the held-out test split and their difference in dB (the location of the
  probabilistic model is its restored image);
- the calibration of the predicted std in 10 equal-count bins (predicted std, observed RMSE,
  ratio), on validation before and after the recalibration fitted there, and on the test split
  after it (CARE: against the clean targets; Noise2Void: against held-out noisy pixels);
- ``worst_ratio_error`` (largest ``|observed/predicted - 1|`` over the test bins),
  ``mean_abs_log_ratio``, and ``top5_error_ratio`` (mean absolute error of the 5% of pixels with
  the highest predicted std over that of the rest);
- seconds of training of each model, and of predicting a test image with each (the uncertainty's
  cost at prediction: one more output channel, its recalibration and its image);
- for Noise2Void, ``signal``: the noise model fitted after training (variance = a * signal + b,
  intensity units) and the calibration of the signal's std (the observation's std less the noise)
  against the error from the clean images of the test split.

Run:   .venv/bin/python bench/uncertainty.py [--experiments demo_care demo_n2v] [--epochs 10]
Smoke: .venv/bin/python bench/uncertainty.py --smoke     (tiny sizes, seconds; run by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

SMOKE = ["data.source.n_images=6", "data.source.shape=[64,64]", "data.patch_size=[32,32]", "data.patches_per_epoch=8",
         "data.batch_size=4", "model.depth=1", "model.base_channels=4", "trainer.enable_progress_bar=false"]


def train(experiment: str, overrides: list[str], project: Path) -> tuple[dict, float]:
    import bioflow

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        summary = bioflow.train([f"experiment={experiment}", f"project_dir={project}", *overrides])
    return summary, time.perf_counter() - start


def calibration_tables(summary: dict) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(summary["run_id"], "evaluation/calibration.json", tmp)
        return json.loads(Path(path).read_text())


def prediction_seconds(plain: dict, prob: dict, project: Path, rounds: int = 5) -> dict:
    """Seconds to predict one test image with each model (restored image; and its std), the two
    interleaved, median over ``rounds`` after one warm-up each."""
    import bioflow
    import numpy as np

    models = {name: bioflow.load_model(s["run_id"], project_dir=str(project)) for name, s in (("plain", plain), ("probabilistic", prob))}
    task = models["plain"].task
    from bioflow.data.module import BioflowDataModule

    data = BioflowDataModule(task.config["data"], task.config["sampler"], 0, type(task).target_kind, None)
    data.prepare()
    image = np.asarray(data.splits["test"][0].image)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds + 1):
        for name, model in models.items():
            start = time.perf_counter()
            model.predict(image[0] if image.shape[0] == 1 else image)
            times[name].append(time.perf_counter() - start)
    out = {name: float(np.median(t[1:])) for name, t in times.items()}
    return {**out, "overhead": out["probabilistic"] / out["plain"] - 1.0, "image_shape": list(image.shape)}


def compare(experiment: str, overrides: list[str], project: Path) -> dict:
    plain, plain_seconds = train(experiment, [*overrides, f"logger.experiment_name=bench_{experiment}_plain"], project)
    prob, prob_seconds = train(experiment, [*overrides, "task.probabilistic=true",
                                            f"logger.experiment_name=bench_{experiment}_probabilistic"], project)
    tables = calibration_tables(prob)
    test = prob["test"]
    return {
        "psnr": {"plain": plain["test"].get("test/psnr"), "probabilistic": test.get("test/psnr"),
                 "difference_db": (test.get("test/psnr") or 0) - (plain["test"].get("test/psnr") or 0)},
        "distribution": tables.get("distribution"),
        "worst_ratio_error": test.get("test/calibration_worst_ratio_error"),
        "mean_abs_log_ratio": test.get("test/calibration_mean_abs_log_ratio"),
        "top5_error_ratio": test.get("test/uncertainty_top5_error_ratio"),
        "calibration_before_on_validation": prob["after_fit"].get("calibration_before"),
        "bins": {k: tables.get(k) for k in ("val_before", "val_after", "test")},
        "train_seconds": {"plain": plain_seconds, "probabilistic": prob_seconds},
        "prediction_seconds": prediction_seconds(plain, prob, project),
        # Noise2Void: the signal's std (the observation's less the noise model's) against the clean image
        "signal": None if "test/signal_calibration_mean_abs_log_ratio" not in test else {
            "noise_model": {k: prob["after_fit"].get(k) for k in ("noise_model_a", "noise_model_b")},
            "mean_abs_log_ratio": test.get("test/signal_calibration_mean_abs_log_ratio"),
            "worst_ratio_error": test.get("test/signal_calibration_worst_ratio_error"),
            "bins": tables.get("test_signal"),
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["demo_care", "demo_n2v"])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the experiment's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the bench runs")
    parser.add_argument("--project-dir", default=None)
    args = parser.parse_args(argv)
    project = Path(args.project_dir or tempfile.mkdtemp(prefix="bioflow-uncertainty-"))
    overrides = [f"seed={args.seed}", "trainer.enable_progress_bar=false"]
    if args.smoke:
        overrides += [*SMOKE, "trainer.max_epochs=1"]
    elif args.epochs:
        overrides.append(f"trainer.max_epochs={args.epochs}")
    result = {"overrides": overrides, **{e: compare(e, overrides, project) for e in args.experiments}}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
