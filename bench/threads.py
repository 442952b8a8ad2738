"""Threads on a busy machine: StarDist 3D targets, a training epoch, checked predictions, quiet and beside another job.

Each measurement runs in a fresh process (OpenMP reads its settings when torch loads, OpenBLAS
when NumPy does), in three variants:

- ``spinning``: OpenMP's default long spin (``GOMP_SPINCOUNT=300000``), OpenBLAS's default wait
  (``OPENBLAS_THREAD_TIMEOUT=28``) and, for the 3D targets, PyTorch's default thread count (the
  training epochs choose theirs as bioflow does);
- ``brief``: bioflow's default, a short spin (``GOMP_SPINCOUNT=1000``), OpenBLAS's threads
  sleeping at once (``OPENBLAS_THREAD_TIMEOUT=4``), fitted threads (and, for the 3D targets, freed
  memory kept as training keeps it: ``bioflow.allocator``);
- ``sleeping``: waiting OpenMP threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``), OpenBLAS's as
  in ``brief``, fitted threads (and kept memory).

and in three conditions: ``quiet``; ``loaded`` beside a job that keeps every core busy (a process
multiplying matrices with as many threads as there are cores, until the measurement ends); and
``loaded_one`` beside a job of one thread (the same process with one thread). Parts:

- ``targets3d``: star distances (64 rays) of a generated 32 x 128 x 128 label volume, the median
  of ``--repeats`` calls after one warm-up;
- ``epoch_workers0`` / ``epoch_workers2``: seconds per training step of a small U-Net (demo data,
  patch 64, batch 8), with 0 and 2 data-loader workers (``data.num_workers``), from the job's own
  step timer;
- ``predict_checked``: seconds per image of predicting small images (128 x 128, ``--images`` of
  them in a loop, as a folder is) with a U-Net of the default width (32 channels, as
  ``unet_own_data``; the demo's has 16) trained briefly by the bench, each checked against its
  training data (the fit check's scores are a few NumPy matrix products per image, large enough
  at this width for NumPy's BLAS to use its threads, which then wait between predictions). ``spinning`` also keeps OpenBLAS's default
  wait (``OPENBLAS_THREAD_TIMEOUT=28``); bioflow sets a short one on import.

The rounds go condition by condition (quiet, then beside each job; the other way round every
other round) and start again, so that each loaded measurement has a quiet one of its own round
rather than one a whole phase apart: this machine's speed drifts over minutes. The pairing is
tight (tens of seconds) when one part and one variant are measured.

Prints one JSON object: per part, variant and condition the median seconds, their spread and each
round's seconds (``seconds_rounds``; failed processes counted in ``failed``, the first one's
``error``), the thread count, and the ratios loaded / quiet and loaded_one / quiet, each round's
against the quiet measurement of the same round (``*_over_quiet_rounds``) and their median
(``*_over_quiet``). Run::

    .venv/bin/python bench/threads.py [--repeats 5] [--steps 40] [--rounds 3] [--parts targets3d] [--variants brief]

Smoke (seconds; run by the tests)::

    .venv/bin/python bench/threads.py --smoke

runs the 3D targets at a tiny size (16 x 48 x 48) in every variant, quiet and loaded (beside the
one-thread job with bioflow's settings only), the epoch with two loader workers (4 steps)
with spinning waits, quiet, and 3 checked predictions of a tiny model with bioflow's settings,
quiet: the figures mean nothing; the JSON has the same structure (what was not run is null, or
an empty list of rounds) plus ``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = r"""
import json, sys, time
import numpy as np
from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
from bioflow.stardist.rays3d import golden_spiral_rays
from bioflow.stardist.targets3d import star_distances_3d
from bioflow.allocator import keep_freed_memory
from bioflow.threads import fit_threads
shape, repeats, fitted = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if fitted:  # bioflow's process settings, as in training
    fit_threads()
    keep_freed_memory()
_, labels = synthetic_nuclei_image(tuple(shape), seed=0, index=0, anisotropy=2.0)
rays = golden_spiral_rays(64)
star_distances_3d(labels, rays)
times = []
for _ in range(repeats):
    t = time.perf_counter()
    star_distances_3d(labels, rays)
    times.append(time.perf_counter() - t)
import torch
print(json.dumps({"seconds": float(np.median(times)), "threads": torch.get_num_threads()}))
"""

EPOCH = r"""
import json, sys
import bioflow, torch
workers, steps, project = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
summary = bioflow.train(["experiment=demo_unet", "trainer.max_epochs=1", f"data.num_workers={workers}",
                         f"data.patches_per_epoch={8 * steps}", "data.batch_size=8", "data.patch_size=[64,64]",
                         "data.source.n_images=8", "data.source.shape=[128,128]", "model.base_channels=16",
                         "trainer.enable_progress_bar=false", "test_after_training=false",
                         f"project_dir={project}", "logger.experiment_name=threads"])
perf = summary["performance"]
print(json.dumps({"seconds": perf.get("seconds_per_step"), "threads": torch.get_num_threads()}))
"""

PREPARE = r"""
import json, sys
import bioflow
project, extra = sys.argv[1], json.loads(sys.argv[2])
summary = bioflow.train(["experiment=demo_unet", "trainer.max_epochs=1", "data.patches_per_epoch=32",
                         "data.source.n_images=8", "data.source.shape=[128,128]", "data.patch_size=[64,64]",
                         "model.base_channels=32", "trainer.enable_progress_bar=false", "test_after_training=false",
                         f"project_dir={project}", "logger.experiment_name=threads_predict", *extra])
print(summary["run_id"])
"""

PREDICT = r"""
import json, sys, time
import bioflow  # first, as in bioflow's commands: its thread settings before NumPy and torch load
import numpy as np, torch
from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
run, project, images = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = bioflow.load_model(run, project_dir=project)
inputs = [synthetic_nuclei_image((128, 128), seed=5, index=i)[0].astype(np.float32) for i in range(4)]
model.predict(inputs[0])
times = []
for i in range(images):  # a folder of small images, each checked against the training data
    t = time.perf_counter()
    out = model.predict(inputs[i % len(inputs)])
    times.append(time.perf_counter() - t)
assert "fit" in out
print(json.dumps({"seconds": float(np.median(times)), "threads": torch.get_num_threads()}))
"""

LOAD = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a / 512)
"""


PARTS = ("targets3d", "epoch_workers0", "epoch_workers2", "predict_checked")
VARIANTS = ("spinning", "brief", "sleeping")
# condition -> threads of the other job (None: no other job)
CONDITIONS = {"quiet": None, "loaded": max(1, os.cpu_count() or 1), "loaded_one": 1}


def environment(variant: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "BIOFLOW_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT"):
        env.pop(name, None)
    if variant == "spinning":
        env["GOMP_SPINCOUNT"] = "300000"  # libgomp's default (bioflow sets a short one on import)
        env["OPENBLAS_THREAD_TIMEOUT"] = "28"  # OpenBLAS's default, 2^28 cycles (bioflow: 2^4)
    elif variant == "sleeping":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def measure(code: str, args: list[str], variant: str) -> dict:
    """One process's result, or ``{"error": ...}`` (a failed, silent or overlong process costs its
    round, not the bench)."""
    try:
        done = subprocess.run([sys.executable, "-c", code, *args], env=environment(variant), capture_output=True,
                              text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 1800 s"}
    lines = (done.stdout or "").strip().splitlines()
    if done.returncode != 0 or not lines:
        said = ((done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}, no output"])
        return {"error": said[-1][:300]}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"not JSON: {lines[-1][:200]}"}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """One part and variant: per condition, its processes' results round by round (``{"seconds":
    ...}`` or ``{"error": ...}``; no list: not run) -> medians, spreads, failures, and each round's
    loaded / quiet ratio against the quiet result of the same round, and their median."""
    entry: dict = {}
    seconds = {}
    for condition in CONDITIONS:
        done = runs.get(condition, [])
        seconds[condition] = [r.get("seconds") for r in done]
        good = [v for v in seconds[condition] if v is not None]
        failed = [r["error"] for r in done if "error" in r]
        entry[condition] = {"median_s": round(statistics.median(good), 4) if good else None,
                            "spread_s": [round(min(good), 4), round(max(good), 4)] if good else None,
                            "seconds_rounds": [None if v is None else round(v, 4) for v in seconds[condition]],
                            "threads": next((r.get("threads") for r in done if "threads" in r), None),
                            **({"failed": len(failed), "error": failed[0]} if failed else {})}
    for condition in ("loaded", "loaded_one"):
        paired = [round(loaded / quiet, 3) for quiet, loaded in zip(seconds["quiet"], seconds[condition])
                  if quiet and loaded]
        entry[f"{condition}_over_quiet"] = round(statistics.median(paired), 2) if paired else None
        entry[f"{condition}_over_quiet_rounds"] = paired
    return entry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of the 3D targets per process")
    parser.add_argument("--steps", type=int, default=40, help="training steps per epoch measurement")
    parser.add_argument("--images", type=int, default=40, help="images predicted per process (predict_checked)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per part, variant and condition (median)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="thread settings to measure (brief: bioflow's)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the bench runs")
    args = parser.parse_args(argv)
    shape = [16, 48, 48] if args.smoke else [32, 128, 128]
    if args.smoke:
        args.repeats, args.steps, args.rounds, args.images = 1, 4, 1, 3
    project = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    run = None
    if "predict_checked" in args.parts:  # a small trained model, once
        tiny = ["data.patches_per_epoch=8", "model.base_channels=4", "model.depth=1"] if args.smoke else []
        done = subprocess.run([sys.executable, "-c", PREPARE, str(project), json.dumps(tiny)], env=environment("brief"),
                              capture_output=True, text=True, timeout=1800)
        run = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "none"
    parts = {
        "predict_checked": (PREDICT, lambda variant: [str(run), str(project), str(args.images)]),
        "targets3d": (TARGETS, lambda variant: [json.dumps(shape), str(args.repeats), "0" if variant == "spinning" else "1"]),
        "epoch_workers0": (EPOCH, lambda variant: ["0", str(args.steps), str(project)]),
        "epoch_workers2": (EPOCH, lambda variant: ["2", str(args.steps), str(project)]),
    }
    result: dict = {"benchmark": "threads", "cpus": os.cpu_count(), "shape": shape, "steps": args.steps,
                    "rounds": args.rounds, "load_threads": {c: t for c, t in CONDITIONS.items() if t}, "parts": {}}
    parts = {name: part for name, part in parts.items() if name in args.parts}
    variants = list(dict.fromkeys(args.variants))
    result["variants"] = variants
    # round by round, each condition in turn (in reverse every other round, so that a steady drift
    # does not always favour the same one): a ratio compares a loaded measurement with the quiet
    # one of its own round, tens of seconds apart for one part and variant, rather than a phase apart
    runs: dict = {}  # (part, variant) -> condition -> one result per round
    for round_ in range(args.rounds):
        order = list(CONDITIONS.items())
        for condition, load_threads in (order if round_ % 2 == 0 else order[::-1]):
            load = None
            if load_threads is not None:
                load = subprocess.Popen([sys.executable, "-c", LOAD, str(load_threads)], env=environment("spinning"))
                time.sleep(1.0)
            try:
                for name, (code, arguments) in parts.items():
                    for variant in variants:
                        smoke_runs = (name == "targets3d" and (condition != "loaded_one" or variant == "brief")
                                      or (name, variant, condition) in (("epoch_workers2", "spinning", "quiet"),
                                                                        ("predict_checked", "brief", "quiet")))
                        if args.smoke and not smoke_runs:
                            continue
                        runs.setdefault((name, variant), {}).setdefault(condition, []).append(
                            measure(code, arguments(variant), variant))
            finally:
                if load is not None:
                    load.kill()
                    load.wait()
    for name in parts:
        for variant in variants:
            result["parts"].setdefault(name, {})[variant] = summarise(runs.get((name, variant), {}))
    if args.smoke:
        result["smoke"] = True
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
