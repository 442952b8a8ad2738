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
  the highest predicted std over that of the rest), and for CARE the same ratio when the pixels
  are ranked by the true local RMSE around each (an optimistic bound of what any std could reach);
- seconds of training of each model, and of predicting a test image with each (the uncertainty's
  cost at prediction: one more output channel, its recalibration and its image);
- for Noise2Void, ``signal``: the noise model fitted after training (variance = a * signal + b,
  intensity units) and the calibration of the signal's std (the observation's std less the noise)
  against the error from the clean images of the test split.

With several seeds (``--seed 0 1 2``) it prints each seed's object under ``seeds`` and, per
experiment, each figure's values with their median and range under ``summary``: two plain models
of different seeds differ by more than the 0.3 dB the probabilistic model is allowed to lose.

On the real nuclei image of the ``stardist`` package (``--experiments real_nuclei_care
real_nuclei_n2v``, with ``--reference-python`` pointing at an interpreter that has the package):
the image is cut into 16 tiles of 128 x 128, 8 to train on, 4 to validate (and recalibrate) on and
4 held out for the test, spread over the image as ``bench/fit_check.py`` spreads them. The image is
the clean target; CARE's input is made from it by a Gaussian blur (sigma 1, ``--blur``), Poisson noise at about
20 photons at intensity 255 (``--photons``) and Gaussian read noise (sigma 4 of 255); Noise2Void's noisy
images are the same without the blur, and its test compares with the image itself.

Run:   .venv/bin/python bench/uncertainty.py [--experiments demo_care demo_n2v] [--epochs 10] [--seed 0 1 2]
       .venv/bin/python bench/uncertainty.py --experiments real_nuclei_care real_nuclei_n2v --reference-python ~/.cache/stardist-ref/bin/python
Smoke: .venv/bin/python bench/uncertainty.py --smoke     (tiny sizes, seconds; run by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

SMOKE = ["data.source.n_images=6", "data.source.shape=[64,64]", "data.patch_size=[32,32]", "data.patches_per_epoch=8",
         "data.batch_size=4", "model.depth=1", "model.base_channels=4", "trainer.enable_progress_bar=false"]


def train(experiment: str | None, overrides: list[str], project: Path) -> tuple[dict, float]:
    import bioflow

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        summary = bioflow.train([*([f"experiment={experiment}"] if experiment else []), f"project_dir={project}", *overrides])
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


def error_ranking(prob: dict, project: Path) -> dict | None:
    """How well the std ranks the test pixels' errors (CARE: the targets are the truth), against
    how well any ranking could: the mean absolute error of the 5% of pixels ranked highest over the
    rest's, ranked by the predicted std and by the true local RMSE in a w x w window around each
    pixel (an oracle that knows the errors; optimistic, as a pixel's own error is in its window).
    Errors in each image's normalised units (its percentile span), pooled over the test images."""
    import bioflow
    import numpy as np
    from scipy import ndimage

    from bioflow.data.module import BioflowDataModule

    model = bioflow.load_model(prob["run_id"], project_dir=str(project))
    task = model.task
    if task.config["task"]["name"] != "care":  # Noise2Void: its truth is held-out noisy pixels
        return None
    data = BioflowDataModule(task.config["data"], task.config["sampler"], 0, type(task).target_kind, None)
    data.prepare()
    normalize = task.config["data"]["normalize"]
    errors, stds = [], []
    for record in data.splits["test"]:
        image, target = np.asarray(record.image, np.float32), np.asarray(record.target, np.float32)
        if target.shape != image.shape:
            return None
        out = model.predict(image[0] if image.shape[0] == 1 else image)
        span = float(np.subtract(*np.percentile(image, [normalize.get("high", 99.8), normalize.get("low", 1.0)])))
        errors.append((out["restored"].reshape(target.shape) - target)[0] / span)
        stds.append(out["uncertainty"].reshape(target.shape)[0] / span)

    def top5(rank: list) -> float:
        order = np.concatenate([r.ravel() for r in rank])
        error = np.abs(np.concatenate([e.ravel() for e in errors]))
        top = order >= np.quantile(order, 0.95)  # as the test metric ranks
        return float(error[top].mean() / error[~top].mean())

    return {"predicted_std": top5(stds), **{f"oracle_local_rmse_{w}x{w}": top5(
        [np.sqrt(ndimage.uniform_filter(e * e, w)) for e in errors]) for w in (3, 5, 9)}}


def compare(name: str, overrides: list[str], project: Path, experiment: str | None = "") -> dict:
    """Plain and probabilistic model of experiment ``name`` (``experiment``: the config's, when
    another; None: the overrides name it)."""
    experiment = name if experiment == "" else experiment
    plain, plain_seconds = train(experiment, [*overrides, f"logger.experiment_name=bench_{name}_plain"], project)
    prob, prob_seconds = train(experiment, [*overrides, "task.probabilistic=true",
                                            f"logger.experiment_name=bench_{name}_probabilistic"], project)
    tables = calibration_tables(prob)
    test = prob["test"]
    return {
        "psnr": {"plain": plain["test"].get("test/psnr"), "probabilistic": test.get("test/psnr"),
                 "difference_db": (test.get("test/psnr") or 0) - (plain["test"].get("test/psnr") or 0)},
        "distribution": tables.get("distribution"),
        "worst_ratio_error": test.get("test/calibration_worst_ratio_error"),
        "mean_abs_log_ratio": test.get("test/calibration_mean_abs_log_ratio"),
        "top5_error_ratio": test.get("test/uncertainty_top5_error_ratio"),
        "top5_error_ratio_ranked_by": error_ranking(prob, project),
        "calibration_before_on_validation": prob["after_fit"].get("calibration_before"),
        "bins": {k: tables.get(k) for k in ("val_before", "val_after", "test")},
        "train_seconds": {"plain": plain_seconds, "probabilistic": prob_seconds},
        "prediction_seconds": prediction_seconds(plain, prob, project),
        # Noise2Void: the signal's std (the observation's less the noise model's) against the clean image
        "signal": None if "test/signal_calibration_mean_abs_log_ratio" not in test else {
            "noise_model": {k: prob["after_fit"].get(k) for k in ("noise_model_a", "noise_model_b")},
            "variance_share": prob["after_fit"].get("signal_variance_share"),  # left to the signal, median
            "mean_abs_log_ratio": test.get("test/signal_calibration_mean_abs_log_ratio"),
            "worst_ratio_error": test.get("test/signal_calibration_worst_ratio_error"),
            "bins": tables.get("test_signal"),
        },
    }


REAL = ("real_nuclei_care", "real_nuclei_n2v")


def bench(name: str):
    """Another script of bench/ as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nuclei_image(reference_python: str | None):
    """The real nuclei image of the stardist package (this interpreter's or the reference's), or None."""
    found = bench("fit_check").nuclei(reference_python)
    return None if found is None else found[0]


def real_nuclei(experiment: str, reference_python: str | None, folder: Path, smoke: bool = False,
                photons: float = 20.0, blur: float = 1.0) -> list[str] | None:
    """Tiles of the real nuclei image as training, validation and test images of ``experiment``
    (written into ``folder``); returns the config overrides, or None without the stardist package."""
    import numpy as np
    import tifffile
    from scipy import ndimage

    clean = nuclei_image(reference_python)
    if clean is None:
        return None
    tiles = bench("fit_check")
    clean = clean.astype(np.float32)
    if smoke:
        clean = clean[:256, :256]
    rng = np.random.default_rng(0)
    signal = ndimage.gaussian_filter(clean, blur) if experiment == "real_nuclei_care" and blur > 0 else clean
    low = rng.poisson(np.clip(signal, 0, None) / 255 * photons) / photons * 255 + rng.normal(0, 4, clean.shape)
    th, tw = clean.shape[0] // 4, clean.shape[1] // 4
    names = {"val": [], "test": []}
    for kind in ("low", "high"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for r in range(4):
        for c in range(4):
            kind = "test" if (r, c) in tiles.HELD_TILES else "val" if (r, c) in tiles.VAL_TILES else "train"
            box = (slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw))
            name = f"{kind}_{r}{c}"
            names.setdefault(kind, []).append(name)
            tifffile.imwrite(folder / "low" / f"{name}.tif", low[box].astype(np.float32))
            tifffile.imwrite(folder / "high" / f"{name}.tif", clean[box])
    care = experiment == "real_nuclei_care"
    return [f"experiment={'care_own_data' if care else 'n2v_own_data'}", "data=tiff_pairs",
            f"data.source.images={folder / 'low'}", f"data.source.targets={folder / 'high'}",
            f"data.split.val=[{','.join(names['val'])}]", f"data.split.test=[{','.join(names['test'])}]",
            "optimizer.lr=0.001", *([] if smoke else ["trainer.max_epochs=15"])]


def run_seed(args: argparse.Namespace, seed: int, project: Path) -> dict:
    """Every experiment of ``args`` trained (plain and probabilistic) with one seed."""
    overrides = [f"seed={seed}", "trainer.enable_progress_bar=false"]
    if args.smoke:
        overrides += [*SMOKE, "trainer.max_epochs=1"]
    elif args.epochs:
        overrides.append(f"trainer.max_epochs={args.epochs}")
    result: dict = {"overrides": overrides}
    for name in args.experiments:
        if name not in REAL:
            result[name] = compare(name, overrides, project)
            continue
        real = real_nuclei(name, args.reference_python, project / name, smoke=args.smoke, photons=args.photons,
                           blur=args.blur)
        result[name] = ({"skipped": "no stardist package here or in --reference-python"} if real is None
                        else {"overrides": real, **compare(name, [*real, *(o for o in overrides if not o.startswith("data.source."))],
                                                            project, experiment=None)})
    return result


def summary(runs: dict) -> dict:
    """Per experiment over seeds: each figure's values in seed order, their median and range. One
    seed's PSNR difference says little where two plain models of different seeds differ by more."""
    out: dict = {}
    figures = {"psnr_plain": ("psnr", "plain"), "psnr_probabilistic": ("psnr", "probabilistic"),
               "difference_db": ("psnr", "difference_db"), "worst_ratio_error": ("worst_ratio_error",),
               "top5_error_ratio": ("top5_error_ratio",), "mean_abs_log_ratio": ("mean_abs_log_ratio",)}
    names = [n for n in next(iter(runs.values())) if n != "overrides"]
    for name in names:
        out[name] = {}
        for figure, path in figures.items():
            values = []
            for run in runs.values():
                value = run.get(name, {})
                for key in path:
                    value = value.get(key) if isinstance(value, dict) else None
                if isinstance(value, (int, float)):
                    values.append(float(value))
            if values:
                out[name][figure] = {"values": values, "median": statistics.median(values), "min": min(values),
                                     "max": max(values)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["demo_care", "demo_n2v"])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the experiment's)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="seeds: each trains both models anew; with several, a summary over them follows")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the bench runs")
    parser.add_argument("--project-dir", default=None)
    parser.add_argument("--photons", type=float, default=20.0,
                        help="real nuclei: photons at intensity 255 in the low-quality images (default 20)")
    parser.add_argument("--blur", type=float, default=1.0,
                        help="real nuclei, CARE: sigma of the Gaussian blur of the low-quality images, pixels (default 1)")
    parser.add_argument("--reference-python", default=None,
                        help=f"an interpreter with the stardist package, for --experiments {' '.join(REAL)}")
    args = parser.parse_args(argv)
    project = Path(args.project_dir or tempfile.mkdtemp(prefix="bioflow-uncertainty-"))
    runs = {seed: run_seed(args, seed, project) for seed in args.seed}
    result = runs[args.seed[0]] if len(runs) == 1 else {"seeds": runs, "summary": summary(runs)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
