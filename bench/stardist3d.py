"""Benchmark of the StarDist 3D numerical core: targets and polyhedron NMS, against the reference.

Builds deterministic synthetic volumes (touching nuclei, z voxels twice the xy pixel size, from
``bioflow.data.synthetic_nuclei``), takes their exact targets plus mild noise as a "prediction"
(probabilities +- 0.02, then replaced by distinct values in the same order so that no
tie can be broken differently; distances +- 3%), and times

* target generation (star distances with 64 rays and anisotropy-aware object probabilities),
* NMS of scene (a), ~10,000 candidates, and of scene (b), ~100,000 candidates, and rendering of
  the kept polyhedra,

on one thread unless ``--threads`` says otherwise. With ``--reference-python`` pointing at an
interpreter that has the reference ``stardist`` package, the same inputs go through the
reference in a subprocess (OpenMP limited to the same threads), and the report adds the time
ratios and the agreement: kept candidates, F1 at IoU 0.9 between the two rendered label volumes,
and the largest target difference on interior voxels. Prints one JSON object.

Every time is the median of ``--repeats`` runs (default 3; it used to be the fastest of them, and a
single run for the NMS of scene (b), the renderings and the reference's NMS): the targets'
``seconds``, each scene's NMS ``seconds`` and ``render_seconds``, and the reference's
``targets_seconds`` and NMS ``seconds`` (so a full run with the reference takes about three times
as long as one run of each). Beside each, ``<key>_spread`` gives the fastest and slowest run and
every run's time (``seconds_all`` keeps listing the runs of ``seconds``); the time ratios are those
of the medians.

Example::

    taskset -c 0 python bench/stardist3d.py --reference-python ~/.cache/stardist-ref/bin/python

Smoke: ``python bench/stardist3d.py --smoke`` (seconds; run by the tests) runs the same steps on
two scenes of 16 x 64 x 64 (grids 1, 4, 4 and 2, 2, 2), one run each (``--repeats 1``: each median
is that one time, its spread that one run); without
``--reference-python`` the JSON says the reference was skipped. The figures mean nothing; the JSON
has the same structure plus ``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
from bioflow.metrics.matching import match_instances
from bioflow.stardist.nms3d import non_maximum_suppression_3d
from bioflow.stardist.polyhedra import polyhedra_to_labels
from bioflow.stardist.rays3d import golden_spiral_rays

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stardist_nms import median_of  # noqa: E402  (the 2D bench's timing helper)
from bioflow.stardist.targets3d import object_probabilities_3d, star_distances_3d

N_RAYS = 64
ANISOTROPY = (2.0, 1.0, 1.0)
PROB_THRESH, NMS_THRESH = 0.5, 0.4
# (volume shape, prediction grid) of the NMS scenes.
SCENES = {"a": ((40, 144, 144), (1, 2, 2)), "b": ((56, 192, 192), (1, 1, 1))}
# Smoke scenes: small, and a coarser grid for (b) (at grid 1, a few hundred candidates overlapping
# one object already take seconds).
SMOKE_SCENES = {"a": ((16, 64, 64), (1, 4, 4)), "b": ((16, 64, 64), (2, 2, 2))}

# Run by the reference interpreter: targets of the label volume and NMS + rendering of each
# scene's candidates, on exactly the inputs bioflow gets.
REFERENCE_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np
from stardist.geometry import star_dist3D, polyhedron_to_label
from stardist.nms import non_maximum_suppression_3d_sparse
from stardist.rays3d import Rays_GoldenSpiral
from stardist.utils import edt_prob

data = dict(np.load(sys.argv[1]))
repeats, out = int(sys.argv[2]), sys.argv[3]
rays = Rays_GoldenSpiral(%(n_rays)d, anisotropy=%(anisotropy)r)
result, saved = {}, {}

def median(fn, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), {"min": min(times), "max": max(times), "rounds": times}, value

labels = data["targets_labels"].astype(np.uint16)
seconds, spread, (dist, prob) = median(lambda: (star_dist3D(labels, rays), edt_prob(labels, anisotropy=%(anisotropy)r)), repeats)
result["targets_seconds"], result["targets_seconds_spread"] = seconds, spread
saved["dist"] = dist
for name in %(scenes)r:
    points, dists, probs = data[name + "_points"], data[name + "_dists"], data[name + "_probs"]
    seconds, spread, (p, pr, d, kept) = median(
        lambda: non_maximum_suppression_3d_sparse(dists, probs, points, rays, nms_thresh=%(nms)r), repeats)
    saved[name + "_kept"] = kept
    saved[name + "_labels"] = polyhedron_to_label(d, p, rays, tuple(data[name + "_shape"]), prob=pr, verbose=False)
    result[name] = {"seconds": seconds, "seconds_spread": spread, "kept": int(len(kept))}
np.savez(out, **saved)
print(json.dumps(result))
"""


def scene_labels(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Touching, slightly overlapping nuclei of radius 8-12 px (xy), half as many z slices."""
    _, labels = synthetic_nuclei_image(shape, seed=seed, radius=(8.0, 12.0), anisotropy=ANISOTROPY[0],
                                       overlap=0.1, clustering=0.5)
    return labels


def noisy_candidates(labels: np.ndarray, grid: tuple[int, int, int], rays, seed: int) -> dict[str, np.ndarray]:
    """Exact targets with mild noise, as candidates above the probability threshold (tie-free)."""
    rng = np.random.default_rng(seed)
    prob = object_probabilities_3d(labels, grid, ANISOTROPY)
    dist = star_distances_3d(labels, rays, grid)
    prob = np.clip(prob + rng.normal(0, 0.02, prob.shape), 0, 1) + rng.uniform(0, 1e-5, prob.shape)
    where = np.nonzero(prob > PROB_THRESH)
    dists = dist[where] * (1 + rng.normal(0, 0.03, (len(where[0]), dist.shape[-1])))
    # float32 cannot keep ~100,000 noisy values in (0.5, 1] apart, and the two implementations
    # break ties differently: the scores are replaced by distinct float32 values in the same
    # order (NMS only depends on the order), so both sides visit the candidates identically.
    scores = prob[where]
    order = np.lexsort((np.arange(scores.size), scores))
    distinct = np.empty(scores.size, np.float32)
    distinct[order] = PROB_THRESH + (1 - PROB_THRESH) * np.arange(1, scores.size + 1) / (scores.size + 1)
    return {
        "points": (np.stack(where, axis=1) * np.array(grid)).astype(np.float32),
        "dists": np.maximum(dists, 1e-3).astype(np.float32),
        "probs": distinct,
    }


def run_reference(python: str, arrays: dict[str, np.ndarray], repeats: int, threads: int,
                  scenes: dict = SCENES) -> tuple[dict, dict]:
    script = REFERENCE_SCRIPT % {"n_rays": N_RAYS, "anisotropy": ANISOTROPY, "scenes": tuple(scenes), "nms": NMS_THRESH}
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(data, **arrays)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        completed = subprocess.run([python, "-c", script, str(data), str(repeats), str(out)],
                                   capture_output=True, text=True, env=env, check=False)
        if completed.returncode != 0:
            message = completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "failed"
            return {"error": message}, {}
        return json.loads(completed.stdout.strip().splitlines()[-1]), dict(np.load(out))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (torch and reference OpenMP)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per targets/NMS/rendering measurement (both sides); the median is reported")
    parser.add_argument("--reference-python", help="interpreter with the reference stardist package")
    parser.add_argument("--smoke", action="store_true", help="tiny volumes, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    scenes = SMOKE_SCENES if args.smoke else SCENES
    if args.smoke:
        args.repeats = 1
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rays = golden_spiral_rays(N_RAYS, ANISOTROPY)
    report: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": args.threads},
        "settings": {"n_rays": N_RAYS, "anisotropy": ANISOTROPY, "prob_thresh": PROB_THRESH,
                     "nms_thresh": NMS_THRESH, "seed": args.seed, "repeats": args.repeats,
                     "scenes": {k: {"shape": s, "grid": g} for k, (s, g) in scenes.items()}},
    }
    if args.smoke:
        report["smoke"] = True
    arrays: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for index, (name, (shape, grid)) in enumerate(scenes.items()):
        labels[name] = scene_labels(shape, args.seed + 17 * index)
        candidates = noisy_candidates(labels[name], grid, rays, args.seed + 17 * index + 1)
        arrays.update({f"{name}_{key}": value for key, value in candidates.items()})
        arrays[name + "_shape"] = np.array(shape)

    targets_labels = labels["b"]
    arrays["targets_labels"] = targets_labels
    seconds, spread, times, (dist, _) = median_of(
        args.repeats, lambda: (star_distances_3d(targets_labels, rays), object_probabilities_3d(targets_labels, anisotropy=ANISOTROPY))
    )
    report["targets"] = {"shape": targets_labels.shape, "objects": int(targets_labels.max()), "seconds": seconds,
                         "seconds_spread": spread, "seconds_all": times}

    kept_ours: dict[str, np.ndarray] = {}
    rendered: dict[str, np.ndarray] = {}
    for name, (shape, _) in scenes.items():
        points, dists, probs = (arrays[f"{name}_{key}"] for key in ("points", "dists", "probs"))
        seconds, spread, times, kept = median_of(
            args.repeats, lambda: non_maximum_suppression_3d(points, dists, probs, rays, PROB_THRESH, NMS_THRESH),
        )
        render_seconds, render_spread, _, rendered[name] = median_of(
            args.repeats, lambda: polyhedra_to_labels(points[kept], dists[kept], probs[kept], shape, rays))
        kept_ours[name] = kept
        report[f"nms_{name}"] = {
            "objects": int(labels[name].max()),
            "candidates": int(len(probs)),
            "distinct_probs": int(len(np.unique(probs))),
            "seconds": seconds,
            "seconds_spread": spread,
            "seconds_all": times,
            "render_seconds": render_seconds,
            "render_seconds_spread": render_spread,
            "kept": int(len(kept)),
            "accuracy@0.5": match_instances(labels[name], rendered[name], 0.5)[0.5].accuracy,
        }

    if args.reference_python:
        reference, saved = run_reference(args.reference_python, arrays, args.repeats, args.threads, scenes)
        report["reference"] = reference
        if saved:
            interior = ndimage.binary_erosion(targets_labels > 0)
            difference = np.abs(dist - saved["dist"])
            report["agreement"] = {
                "targets_max_error_interior": float(difference[interior].max()),
                "targets_fraction_differing": float(np.mean(difference > 1e-3)),
                "targets_time_ratio": report["targets"]["seconds"] / reference["targets_seconds"],
            }
            for name in scenes:
                ref_kept = set(saved[name + "_kept"].tolist())
                report["agreement"][name] = {
                    "kept_only_bioflow": len(set(kept_ours[name].tolist()) - ref_kept),
                    "kept_only_reference": len(ref_kept - set(kept_ours[name].tolist())),
                    "f1@0.9": match_instances(saved[name + "_labels"].astype(np.int64), rendered[name], 0.9)[0.9].f1,
                    "reference_accuracy@0.5": match_instances(labels[name], saved[name + "_labels"].astype(np.int64), 0.5)[0.5].accuracy,
                    "nms_time_ratio": report[f"nms_{name}"]["seconds"] / reference[name]["seconds"],
                }
    elif args.smoke:
        report["reference"] = {"skipped": "no --reference-python (an interpreter with the stardist package)"}
    torch.set_num_threads(threads)  # as it was (main may run in-process, e.g. in the tests)
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
