"""StarDist on real annotated nuclei: bioflow against the reference StarDist, same split, same budget.

The data: a real fluorescence image of nuclei with its instance annotation, by default the DSB2018
crop that ships with the reference ``stardist`` package (512 x 512, 125 nuclei), or any image and
label TIFF given with ``--image`` / ``--mask``. The image is cut into three regions, each a file of
its own (objects cut at region borders stay as partial objects):

    train = left half, validation = top right quarter, test = bottom right quarter

Nothing of the test region is used for training or for choosing thresholds or checkpoints. Each
side trains at the reference's budget (batch 4, patch 128, 32 rays, grid 2, flips and quarter
turns; ``--steps`` steps; thresholds chosen on the validation region), predicts the test region,
and the predicted labels of both are scored here with the same matching functions (bioflow's,
which equal ``stardist.matching``): accuracy, F1, precision, recall and panoptic quality at IoU
0.5 and 0.7. Training runs with ``--threads`` threads per side, each side pinned to its own CPU
core when there are enough; both sides run at the same time.

bioflow trains through its public API, exactly as a user would on TIFF folders
(``experiment=stardist_own_data`` plus an explicit split); ``--override`` adds config overrides
(for ablations). The reference trains in a separate interpreter given by ``--reference-python``,
which needs ``stardist`` and ``tensorflow-cpu``; make it with::

    python3 -m venv ~/.cache/stardist-ref
    ~/.cache/stardist-ref/bin/pip install stardist==0.9.2 csbdeep==0.8.2 tensorflow-cpu

Without ``--reference-python`` only bioflow runs (the data then come from ``--image``/``--mask``,
or from a ``stardist`` package importable here). Prints one JSON object. With ``--workdir``, each
finished run is kept there as JSON, and a rerun with the same folder resumes where it stopped.

Example::

    .venv/bin/python bench/stardist_real.py --reference-python ~/.cache/stardist-ref/bin/python \\
        --steps 500 5000 --seeds 1 2

Besides the scores, ``step_time`` gives per budget each side's seconds per training step over the
seeds (median and range) and bioflow's over the reference's, seed by seed (the two sides of a seed
run at the same time, each on its own core).

Smoke (seconds; run by the tests): ``.venv/bin/python bench/stardist_real.py --smoke`` runs the
same steps on a 128 x 128 image (a crop of the real one when it is at hand, else a generated image
of nuclei, the JSON saying the real one was skipped) at a tiny budget: batch 2, patch 32, 8 rays,
2 steps, the first seed, a U-Net of depth 1 and width 4; the reference side runs only with
``--reference-python`` (else the JSON says it was skipped). The scores mean nothing; the JSON has
the same structure plus ``"smoke": true``. ``--project-dir`` keeps bioflow's MLflow store there
(default: in the work folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

BATCH, PATCH, RAYS, GRID, STEPS_PER_EPOCH = 4, 128, 32, 2, 100
BUDGET = {"batch": BATCH, "patch": PATCH, "rays": RAYS, "grid": GRID, "steps_per_epoch": STEPS_PER_EPOCH}
SMOKE_BUDGET = {"batch": 2, "patch": 32, "rays": 8, "grid": 2, "steps_per_epoch": 2}
SMOKE_SIZE = 128
# bioflow's network in a smoke run (added to --override).
SMOKE_OVERRIDES = ["model.depth=1", "model.base_channels=4", "task.head_features=8"]
TAUS = (0.5, 0.7)
SCORES = ("accuracy", "f1", "precision", "recall", "panoptic_quality")

DATA_SCRIPT = r"""
import sys, numpy as np
from stardist.data import test_image_nuclei_2d
image, labels = test_image_nuclei_2d(return_mask=True)
np.savez(sys.argv[1], image=image, labels=labels)
"""

# Run by the reference interpreter: train StarDist2D on the regions, choose thresholds on the
# validation region, predict the test region; prints one JSON line.
REFERENCE_SCRIPT = r"""
import json, os, random, sys, time
args = json.loads(sys.argv[1])
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(args["threads"])
tf.config.threading.set_inter_op_parallelism_threads(args["threads"])
import tifffile
from csbdeep.utils import normalize
from stardist.models import Config2D, StarDist2D
from stardist.matching import matching_dataset

random.seed(args["seed"]); np.random.seed(args["seed"]); tf.random.set_seed(args["seed"])
data = args["data"]
raw = {s: tifffile.imread(f"{data}/images/{s}.tif").astype(np.float32) for s in ("train", "val", "test")}
Y = {s: tifffile.imread(f"{data}/masks/{s}.tif").astype(np.int32) for s in ("train", "val", "test")}
if args["norm"] == "dataset":
    lo, hi = np.percentile(raw["train"], [1, 99.8])
    X = {s: (x - lo) / max(hi - lo, 1e-6) for s, x in raw.items()}
else:
    X = {s: normalize(x, 1, 99.8) for s, x in raw.items()}

def augmenter(x, y):
    if np.random.rand() < 0.5:
        x, y = x[:, ::-1], y[:, ::-1]
    if np.random.rand() < 0.5:
        x, y = x[::-1], y[::-1]
    if np.random.rand() < 0.5:
        k = np.random.randint(4)
        x, y = np.rot90(x, k), np.rot90(y, k)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)

class Timer(tf.keras.callbacks.Callback):
    seconds, steps = 0.0, 0
    def on_epoch_begin(self, epoch, logs=None):
        self.start = self.last = time.perf_counter()
    def on_train_batch_end(self, batch, logs=None):
        self.last = time.perf_counter(); Timer.steps += 1
    def on_epoch_end(self, epoch, logs=None):
        Timer.seconds += self.last - self.start

conf = Config2D(n_rays=args["rays"], grid=(args["grid"],) * 2, n_channel_in=1,
                train_patch_size=(args["patch"],) * 2, train_batch_size=args["batch"], train_tensorboard=False)
model = StarDist2D(conf, name=f"ref_seed{args['seed']}", basedir=args["workdir"])
model.prepare_for_training()
model.callbacks.append(Timer())
start = time.perf_counter()
model.train([X["train"]], [Y["train"]], validation_data=([X["val"]], [Y["val"]]), augmenter=augmenter,
            epochs=args["epochs"], steps_per_epoch=args["steps_per_epoch"])
train_wall = time.perf_counter() - start
start = time.perf_counter()
model.optimize_thresholds([X["val"]], [Y["val"]])
thresholds_s = time.perf_counter() - start
labels, _ = model.predict_instances(X["test"])
np.save(args["out"], labels.astype(np.int32))
check = matching_dataset([Y["test"]], [labels], thresh=list(args["taus"]), show_progress=False)
print(json.dumps({
    "parameters": int(model.keras_model.count_params()),
    "train_wall_s": train_wall, "train_step_s": Timer.seconds / max(Timer.steps, 1), "steps": Timer.steps,
    "patches_per_s": Timer.steps * args["batch"] / max(Timer.seconds, 1e-9), "thresholds_s": thresholds_s,
    "prob_thresh": float(model.thresholds.prob), "nms_thresh": float(model.thresholds.nms),
    "stardist_matching_accuracy": {str(t): float(s.accuracy) for t, s in zip(args["taus"], check)},
}))
"""

# Run in a fresh bioflow interpreter: train through the public API, predict the test region.
BIOFLOW_SCRIPT = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(args["threads"])
import bioflow
from bioflow.prediction import predict
start = time.perf_counter()
summary = bioflow.train(args["overrides"])
train_wall = time.perf_counter() - start
start = time.perf_counter()
outputs = predict(summary["best_checkpoint"], [args["test_image"]], args["out"], project_dir=args["project_dir"],
                  progress=False, device="cpu")
predict_s = time.perf_counter() - start
print(json.dumps({"summary": summary, "train_wall_s": train_wall, "predict_s": predict_s,
                  "labels": str(outputs[0]["labels"])}))
"""


def load_data(args) -> tuple[np.ndarray, np.ndarray, str]:
    """The image and its labels: given files, the stardist package here, or the reference interpreter's
    (a smoke run: a crop of them, or else a generated image)."""
    import tifffile

    if args.image:
        image, labels, origin = tifffile.imread(args.image), tifffile.imread(args.mask), f"{args.image} + {args.mask}"
    else:
        found = stardist_nuclei(args.reference_python)
        if found is None and args.smoke:
            from bioflow.data.synthetic_nuclei import synthetic_nuclei_image

            image, labels = synthetic_nuclei_image((SMOKE_SIZE, SMOKE_SIZE), seed=5, index=0)[:2]
            return image, labels, "generated nuclei (smoke: the stardist package's real image is not at hand)"
        if found is None:
            sys.exit("stardist_real: give --image/--mask, or --reference-python with the stardist package")
        image, labels, origin = (*found, "stardist.data.test_image_nuclei_2d (DSB2018 crop)")
    if args.smoke:
        crop = (slice(0, SMOKE_SIZE), slice(0, SMOKE_SIZE))
        return image[crop], labels[crop], f"{origin}, {SMOKE_SIZE} x {SMOKE_SIZE} crop"
    return image, labels, origin


def stardist_nuclei(reference_python: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The real nuclei image and labels of the stardist package, read by this interpreter or the
    reference one (whichever has the package); None when neither has it."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "data.npz"
        for python in filter(None, (sys.executable, reference_python)):
            if subprocess.run([python, "-c", DATA_SCRIPT, str(target)], capture_output=True, cwd=tmp).returncode == 0:
                data = np.load(target)
                return data["image"], data["labels"]
    return None


def write_regions(image: np.ndarray, labels: np.ndarray, folder: Path) -> dict[str, int]:
    """Train / validation / test regions as TIFF files; returns the objects in each."""
    import tifffile

    h, w = image.shape
    regions = {"train": (slice(0, h), slice(0, w // 2)), "val": (slice(0, h // 2), slice(w // 2, w)),
               "test": (slice(h // 2, h), slice(w // 2, w))}
    counts = {}
    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for name, region in regions.items():
        tifffile.imwrite(folder / "images" / f"{name}.tif", np.ascontiguousarray(image[region]))
        tifffile.imwrite(folder / "masks" / f"{name}.tif", np.ascontiguousarray(labels[region]).astype(np.int32))
        counts[name] = int(len(np.unique(labels[region])) - 1)
    return counts


def _pinned(core: int | None):
    if core is None or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, {core})


def _run(command: list[str], threads: int, core: int | None, log: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=fh, text=True, env=env, preexec_fn=_pinned(core))
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "log": str(log)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def score(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    from bioflow.metrics.matching import match_dataset

    stats = match_dataset([(truth, predicted)], TAUS)
    out = {f"{name}@{tau}": float(getattr(stats[tau], name)) for tau in TAUS for name in SCORES}
    out["n_true"], out["n_pred"] = int(stats[TAUS[0]].n_true), int(stats[TAUS[0]].n_pred)
    return out


def cached(path: Path, job, *args) -> dict:
    """Run ``job`` unless a finished result of it is in ``path`` (a rerun with the same
    ``--workdir`` resumes an interrupted benchmark); failed runs are run again."""
    if path.is_file():
        result = json.loads(path.read_text())
        if "error" not in result:
            return result
    result = job(*args)
    path.write_text(json.dumps(result, indent=1))
    return result


def bioflow_job(work: Path, data: Path, steps: int, seed: int, threads: int, core, overrides: list[str],
                budget: dict = BUDGET, project: Path | None = None) -> dict:
    job = work / f"bioflow_s{seed}_{steps}"
    job.mkdir(parents=True, exist_ok=True)
    project = project or work / "project"
    batch, patch, per_epoch, grid = budget["batch"], budget["patch"], budget["steps_per_epoch"], budget["grid"]
    config = [
        "experiment=stardist_own_data", f"data.source.images={data / 'images'}", f"data.source.masks={data / 'masks'}",
        "data.split.train=[train]", "data.split.val=[val]", "data.split.test=[test]",
        f"data.patch_size=[{patch},{patch}]", f"data.batch_size={batch}",
        f"data.patches_per_epoch={batch * per_epoch}", f"trainer.max_epochs={max(1, steps // per_epoch)}",
        f"task.n_rays={budget['rays']}", f"task.grid=[{grid},{grid}]", "data.num_workers=0", f"seed={seed}",
        f"project_dir={project}", "logger.experiment_name=bench_stardist_real", "trainer.enable_progress_bar=false",
        *overrides,
    ]
    args = {"threads": threads, "overrides": config, "test_image": str(data / "images" / "test.tif"),
            "out": str(job / "predicted"), "project_dir": str(project)}
    result = _run([sys.executable, "-c", BIOFLOW_SCRIPT, json.dumps(args)], threads, core, job / "log.txt")
    if "error" in result:
        return result
    import tifffile

    summary = result["summary"]
    perf = summary.get("performance", {})
    return {
        "scores": score(tifffile.imread(data / "masks" / "test.tif"), tifffile.imread(result["labels"])),
        "prob_thresh": (summary.get("after_fit") or {}).get("stardist.prob_thresh"),
        "nms_thresh": (summary.get("after_fit") or {}).get("stardist.nms_thresh"),
        "train_step_s": perf.get("seconds_per_step"), "patches_per_s": perf.get("patches_per_second"),
        "steps": perf.get("steps"), "train_wall_s": result["train_wall_s"], "predict_s": result["predict_s"],
        "wall_s": result["wall_s"], "run_id": summary["run_id"],
        "own_test_accuracy@0.5": summary["test"].get("test/accuracy_0.5"),
    }


def reference_job(python: str, work: Path, data: Path, steps: int, seed: int, threads: int, core, norm: str,
                  budget: dict = BUDGET) -> dict:
    job = work / f"reference_s{seed}_{steps}"
    job.mkdir(parents=True, exist_ok=True)
    per_epoch = budget["steps_per_epoch"]
    args = {"data": str(data), "seed": seed, "threads": threads, "rays": budget["rays"], "grid": budget["grid"],
            "patch": budget["patch"], "batch": budget["batch"], "epochs": max(1, steps // per_epoch),
            "steps_per_epoch": per_epoch,
            "workdir": str(job), "out": str(job / "labels.npy"), "taus": list(TAUS), "norm": norm}
    result = _run([python, "-c", REFERENCE_SCRIPT, json.dumps(args)], threads, core, job / "log.txt")
    if "error" in result:
        return result
    import tifffile

    result["scores"] = score(tifffile.imread(data / "masks" / "test.tif"), np.load(job / "labels.npy"))
    return result


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "scores" in r]
    if not ok:
        return {}
    keys = [f"{s}@{t}" for t in TAUS for s in SCORES]
    out = {k: float(np.mean([r["scores"][k] for r in ok])) for k in keys}
    for k in ("train_step_s", "patches_per_s", "wall_s"):
        values = [r[k] for r in ok if r.get(k) is not None]
        if values:
            out[k] = float(np.mean(values))
    return out


def spread(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "rounds": [float(v) for v in values]}


def step_times(sides: dict) -> dict:
    """Seconds per training step of each side over the seeds (median, range), and bioflow's over the
    reference's per seed (the two ran at the same time, each on its own core)."""
    out = {}
    for side, runs in sides.items():
        values = [r["train_step_s"] for r in runs.values() if r.get("train_step_s") is not None]
        if values:
            out[f"{side}_s_per_step"] = spread(values)
    paired = [sides["bioflow"][seed]["train_step_s"] / sides["reference"][seed]["train_step_s"]
              for seed in sides.get("bioflow", {}) if seed in sides.get("reference", {})
              and sides["bioflow"][seed].get("train_step_s") and sides["reference"][seed].get("train_step_s")]
    if paired:
        out["ratio_bioflow_over_reference"] = spread(paired)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-python", help="interpreter with stardist + tensorflow-cpu (the reference)")
    parser.add_argument("--image", help="image TIFF (2D, one channel) instead of the stardist package's")
    parser.add_argument("--mask", help="its instance labels (TIFF)")
    parser.add_argument("--steps", type=int, nargs="+", default=[500], help="training budgets (steps of batch 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="threads per side")
    parser.add_argument("--override", action="append", default=[], help="extra bioflow config override (repeatable)")
    parser.add_argument("--reference-norm", choices=["dataset", "per_image"], default="dataset",
                        help="normalisation on the reference side: percentiles of the training region for all "
                             "regions (as bioflow's dataset mode) or of each region (csbdeep's normalize)")
    parser.add_argument("--skip-bioflow", action="store_true")
    parser.add_argument("--workdir", help="keep runs and logs here (default: a temporary folder)")
    parser.add_argument("--project-dir", help="bioflow's MLflow store (default: <work folder>/project)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    if bool(args.image) != bool(args.mask):
        parser.error("--image and --mask go together")
    budget = SMOKE_BUDGET if args.smoke else BUDGET
    if args.smoke:
        args.steps, args.seeds, args.override = [2], args.seeds[:1], [*SMOKE_OVERRIDES, *args.override]
    project = Path(args.project_dir).resolve() if args.project_dir else None

    image, labels, origin = load_data(args)
    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name).resolve()
    data = work / "data"
    counts = write_regions(image, labels, data)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = args.threads == 1 and len(cores) >= 2
    report = {
        "benchmark": "stardist_real", "data": origin, "shape": list(image.shape), "objects_per_region": counts,
        "split": "train = left half, val = top-right quarter, test = bottom-right quarter",
        "budget": {"batch": budget["batch"], "patch": budget["patch"], "n_rays": budget["rays"],
                   "grid": budget["grid"]},
        "threads_per_side": args.threads, "pinned_cores": pin, "bioflow_overrides": args.override,
        "reference_norm": args.reference_norm, "runs": {},
    }
    if args.smoke:
        report["smoke"] = True
    jobs = []
    # One worker per core: runs on one core follow one another. The reference gets a core of its
    # own; without it, bioflow's runs share the cores out.
    lanes = [cores[i] if pin else None for i in range(2 if pin else 1)]
    ours_lanes = lanes[:1] if args.reference_python else lanes
    pools = {lane: ThreadPoolExecutor(max_workers=1) for lane in lanes}
    with contextlib.ExitStack() as stack:
        for pool in pools.values():
            stack.enter_context(pool)
        turn = 0
        for steps in args.steps:
            for seed in args.seeds:
                if not args.skip_bioflow:
                    lane = ours_lanes[turn % len(ours_lanes)]
                    turn += 1
                    jobs.append(((steps, seed, "bioflow"), pools[lane].submit(
                        cached, work / f"bioflow_s{seed}_{steps}.json",
                        bioflow_job, work, data, steps, seed, args.threads, lane, args.override, budget, project)))
                if args.reference_python:
                    lane = lanes[-1]
                    jobs.append(((steps, seed, "reference"), pools[lane].submit(
                        cached, work / f"reference_s{seed}_{steps}.json", reference_job,
                        args.reference_python, work, data, steps, seed, args.threads, lane,
                        args.reference_norm, budget)))
        for (steps, seed, side), future in jobs:
            report["runs"].setdefault(str(steps), {}).setdefault(side, {})[str(seed)] = future.result()
    report["mean_over_seeds"] = {
        steps: {side: summarise(list(r.values())) for side, r in sides.items()} for steps, sides in report["runs"].items()
    }
    report["step_time"] = {steps: step_times(sides) for steps, sides in report["runs"].items()}
    if args.smoke and not args.reference_python:
        report["reference"] = {"skipped": "no --reference-python (an interpreter with stardist and tensorflow)"}
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
