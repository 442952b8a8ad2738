"""Benchmark of the StarDist numerical core: training targets and non-maximum suppression.

Builds deterministic synthetic scenes (ellipses on a 1024 x 1024 image), takes their exact
targets plus mild noise as a "prediction", and times

* target generation (star distances with 32 rays and object probabilities) of a label image,
* NMS of scene (a), ~400 objects and ~70,000 candidates, and of the dense scene (b), ~900 objects
  and ~150,000 candidates, with the accuracy at IoU 0.5 of the rendered result,

on one thread unless ``--threads`` says otherwise. With ``--reference-python`` pointing at an
interpreter that has the reference ``stardist`` package, the same work is timed there too (in a
subprocess). Prints one JSON object.

Every time is the median of ``--repeats`` runs (default 7: with 3, two runs of the bench
differed by up to 9%; it used to be the fastest of them): the targets' ``seconds`` and
``star_distances_seconds``, each scene's NMS ``seconds`` and ``render_seconds``, and the
reference's ``targets_seconds`` and NMS ``seconds``. Beside each,
``<key>_spread`` gives the fastest and slowest run and every run's time (``seconds_all`` keeps
listing the runs of ``seconds``).

Example::

    taskset -c 0 python bench/stardist_nms.py --reference-python /tmp/sdref/bin/python

Smoke: ``python bench/stardist_nms.py --smoke`` (seconds; run by the tests) runs the same steps on a
256 x 256 image with 25 and 50 objects, one run each (``--repeats 1``: each median is that one time,
its spread that one run); without ``--reference-python`` the JSON
says the reference was skipped. The figures mean nothing; the JSON has the same structure plus
``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bioflow.metrics.matching import match_instances
from bioflow.stardist.nms import non_maximum_suppression
from bioflow.stardist.polygons import polygons_to_labels
from bioflow.stardist.targets import object_probabilities, star_distances

SHAPE = (1024, 1024)
N_RAYS = 32
PROB_THRESH, NMS_THRESH = 0.5, 0.4
# (number of objects, smallest and largest semi-axis) of the two NMS scenes.
SCENES = {"a": (400, 8.0, 19.0), "b": (900, 8.0, 18.0)}
SMOKE_SHAPE = (256, 256)
SMOKE_SCENES = {"a": (25, 8.0, 19.0), "b": (50, 8.0, 18.0)}

# Run by the reference interpreter: times the reference functions on the saved scenes and saves
# its rendered label images for scoring here.
REFERENCE_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np
from stardist.geometry import star_dist, polygons_to_label
from stardist.nms import non_maximum_suppression
from stardist.utils import edt_prob

data = np.load(sys.argv[1])
repeats, out = int(sys.argv[2]), sys.argv[3]
result, rendered = {}, {}

def median(fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), {"min": min(times), "max": max(times), "rounds": times}, value

labels = data["targets_labels"]
seconds, spread, _ = median(lambda: (star_dist(labels, %(n_rays)d), edt_prob(labels)))
result["targets_seconds"], result["targets_seconds_spread"] = seconds, spread
for name in %(scenes)r:
    prob, dist = data[name + "_prob"], data[name + "_dist"]
    seconds, spread, (points, probs, dists) = median(
        lambda: non_maximum_suppression(dist, prob, prob_thresh=%(prob)r, nms_thresh=%(nms)r, b=0)
    )
    rendered[name] = polygons_to_label(dists, points, prob.shape, prob=probs)
    result[name] = {"seconds": seconds, "seconds_spread": spread, "kept": int(len(points))}
np.savez(out, **rendered)
print(json.dumps(result))
"""


def ellipse_scene(n_objects: int, radii: tuple[float, float], seed: int,
                  shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Random ellipses that may touch but overlap an earlier one by at most 5% (else redrawn)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    count = attempts = 0
    while count < n_objects and attempts < 100 * n_objects:
        attempts += 1
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a, b = rng.uniform(*radii, size=2)
        theta = rng.uniform(0, math.pi)
        reach = int(max(a, b)) + 2
        y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, shape[0])
        x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, shape[1])
        yy, xx = np.mgrid[y0:y1, x0:x1]
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        window = labels[y0:y1, x0:x1]
        if not inside.any() or (window[inside] > 0).mean() > 0.05:
            continue
        count += 1
        window[inside & (window == 0)] = count
    return labels


def noisy_prediction(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact targets with mild noise: probabilities +- 0.02, distances +- 3%."""
    rng = np.random.default_rng(seed)
    prob = object_probabilities(labels)
    dist = star_distances(labels, N_RAYS)
    prob = np.clip(prob + rng.normal(0, 0.02, prob.shape), 0, 1).astype(np.float32)
    dist = np.maximum(dist * (1 + rng.normal(0, 0.03, dist.shape)), 0).astype(np.float32)
    return prob, dist


def median_of(repeats: int, fn: Callable[[], object]) -> tuple[float, dict, list[float], object]:
    """Median of ``repeats`` runs, their spread (fastest, slowest, every run), all times, and the last value."""
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), {"min": min(times), "max": max(times), "rounds": list(times)}, times, value


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    return match_instances(labels, predicted, 0.5)[0.5].accuracy


def run_reference(
    python: str, arrays: dict[str, np.ndarray], repeats: int, threads: int, labels: dict[str, np.ndarray]
) -> dict:
    """Time the reference package in a subprocess (OpenMP limited to ``threads``)."""
    script = REFERENCE_SCRIPT % {
        "n_rays": N_RAYS, "scenes": tuple(labels), "prob": PROB_THRESH, "nms": NMS_THRESH,
    }
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "scenes.npz", Path(tmp) / "rendered.npz"
        np.savez(data, **arrays)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        completed = subprocess.run(
            [python, "-c", script, str(data), str(repeats), str(out)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if completed.returncode != 0:
            return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "failed"}
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        rendered = np.load(out)
        for name in labels:
            result[name]["accuracy@0.5"] = accuracy(labels[name], rendered[name])
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (torch and reference OpenMP)")
    parser.add_argument("--repeats", type=int, default=7, help="runs per measurement; the median is reported")
    parser.add_argument("--reference-python", help="interpreter with the reference stardist package")
    parser.add_argument("--smoke", action="store_true", help="a tiny image, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    shape, scenes = (SMOKE_SHAPE, SMOKE_SCENES) if args.smoke else (SHAPE, SCENES)
    if args.smoke:
        args.repeats = 1
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)

    report: dict = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "threads": args.threads,
        },
        "settings": {
            "shape": shape,
            "n_rays": N_RAYS,
            "prob_thresh": PROB_THRESH,
            "nms_thresh": NMS_THRESH,
            "seed": args.seed,
            "repeats": args.repeats,
        },
    }
    arrays: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    if args.smoke:
        report["smoke"] = True
    for index, (name, (n_objects, r_min, r_max)) in enumerate(scenes.items()):
        labels[name] = ellipse_scene(n_objects, (r_min, r_max), args.seed + 17 * index, shape)
        prob, dist = noisy_prediction(labels[name], args.seed + 17 * index + 1)
        arrays[name + "_prob"], arrays[name + "_dist"] = prob, dist

    targets_labels = labels["a"]
    arrays["targets_labels"] = targets_labels
    seconds, spread, times, _ = median_of(
        args.repeats, lambda: (star_distances(targets_labels, N_RAYS), object_probabilities(targets_labels))
    )
    dist_seconds, dist_spread, _, _ = median_of(args.repeats, lambda: star_distances(targets_labels, N_RAYS))
    report["targets"] = {
        "objects": int(len(np.unique(targets_labels)) - 1),
        "seconds": seconds,
        "seconds_spread": spread,
        "star_distances_seconds": dist_seconds,
        "star_distances_seconds_spread": dist_spread,
        "seconds_all": times,
    }

    for name in scenes:
        prob, dist = arrays[name + "_prob"], arrays[name + "_dist"]
        rows, cols = np.nonzero(prob > PROB_THRESH)
        points = np.stack([rows, cols], axis=1)
        seconds, spread, times, kept = median_of(
            args.repeats,
            lambda: non_maximum_suppression(points, dist[rows, cols], prob[rows, cols], PROB_THRESH, NMS_THRESH),
        )
        render_seconds, render_spread, _, rendered = median_of(
            args.repeats, lambda: polygons_to_labels(points[kept], dist[rows, cols][kept], prob[rows, cols][kept], shape)
        )
        report[f"nms_{name}"] = {
            "objects": int(len(np.unique(labels[name])) - 1),
            "candidates": int(rows.size),
            "seconds": seconds,
            "seconds_spread": spread,
            "seconds_all": times,
            "render_seconds": render_seconds,
            "render_seconds_spread": render_spread,
            "kept": int(len(kept)),
            "accuracy@0.5": accuracy(labels[name], rendered),
        }

    if args.reference_python:
        report["reference"] = run_reference(args.reference_python, arrays, args.repeats, args.threads, labels)
    elif args.smoke:
        report["reference"] = {"skipped": "no --reference-python (an interpreter with the stardist package)"}
    torch.set_num_threads(threads)  # as it was (main may run in-process, e.g. in the tests)
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
