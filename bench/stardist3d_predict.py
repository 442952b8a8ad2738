"""StarDist 3D prediction of stacks larger than one tile: time, peak memory and accuracy by depth.

Generates synthetic stacks of nuclei (z step twice the pixel size) of several depths at a fixed
width, writes each as a TIFF and runs ``bioflow predict <model> stack.tif --tile-size ...`` on it
in a fresh process (tiles, one global 3D NMS over the candidates of every tile, rendering). For
each depth: wall seconds, the process's peak RSS, the label volume's own size (int32), the number
of objects and accuracy@0.5 against the generated labels. Peak RSS minus the label volume is what
the tiles and candidates cost; at a fixed tile it should stay flat as the depth grows.

Each depth is predicted ``--repeats`` times (default 3), each time in a fresh process writing to a
fresh folder: ``seconds`` is the median of the rounds, ``seconds_spread`` gives the fastest and
slowest round and every round's time, ``peak_rss_mib`` is the largest peak RSS of the rounds, and
the objects and accuracy are those of the first round (the rounds predict the same).

Run (a model trained by ``bioflow train experiment=demo_stardist3d``)::

    .venv/bin/python bench/stardist3d_predict.py --model <checkpoint or run id> --depths 48 96 192 [--repeats 3]

Prints one JSON object.

Smoke (seconds; run by the tests)::

    .venv/bin/python bench/stardist3d_predict.py --smoke

predicts one 16 x 48 x 48 stack with tile 8 x 32 x 32 (several tiles, one global NMS) in a fresh
``bioflow predict`` process, once (``--repeats 1``: the median is that one time), with ``--model`` or else an untrained tiny StarDist 3D checkpoint
(random weights: the objects and the accuracy mean nothing); the job is recorded under
``--project-dir``, else in the temporary folder. The JSON has the same structure plus
``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# A tiny StarDist 3D network for a smoke run without --model (random weights).
SMOKE_MODEL = ["experiment=demo_stardist3d", "model.depth=1", "model.base_channels=4", "task.n_rays=16",
               "task.stem_channels=4", "task.features=4", "task.head_features=8"]


def median_and_spread(values: list[float], digits: int = 2) -> tuple[float, dict]:
    """The median of the rounds, and their spread: fastest, slowest and every round (rounded)."""
    return round(statistics.median(values), digits), {
        "min": round(min(values), digits), "max": round(max(values), digits),
        "rounds": [round(v, digits) for v in values]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint file or run id of a StarDist 3D model (required but with --smoke)")
    parser.add_argument("--depths", type=int, nargs="+", default=[48, 96, 192])
    parser.add_argument("--width", type=int, default=192, help="Y and X of the stacks")
    parser.add_argument("--tile", type=int, nargs=3, default=[32, 128, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh bioflow predict processes per depth; the median time is reported (default 3)")
    parser.add_argument("--project-dir", help="where the model's run is stored (for a run id)")
    parser.add_argument("--smoke", action="store_true", help="one tiny stack, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    if not args.model and not args.smoke:
        parser.error("the following arguments are required: --model")
    if args.smoke:
        args.depths, args.width, args.tile, args.threads, args.repeats = [16], 48, [8, 32, 32], min(args.threads, 2), 1
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    import tifffile

    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
    from bioflow.metrics.matching import match_instances

    bioflow = str(Path(sys.executable).with_name("bioflow"))
    report = {"benchmark": "stardist3d_predict", "model": args.model, "width": args.width, "tile": args.tile,
              "threads": args.threads, "repeats": args.repeats, "stacks": []}
    if args.smoke:
        report["smoke"] = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke and not args.model:
            from bioflow.testing import make_checkpoint

            args.model = str(make_checkpoint(Path(tmp) / "stardist3d.ckpt", *SMOKE_MODEL, spatial_dims=3,
                                             pixel_size=[2.0, 1.0, 1.0]))
            report["model"] = "untrained tiny StarDist 3D (smoke)"
        if args.smoke and not args.project_dir:  # the job's record: not into the working directory
            args.project_dir = str(Path(tmp) / "project")
        for depth in args.depths:
            image, labels = synthetic_nuclei_image((depth, args.width, args.width), seed=11, index=0, anisotropy=2.0)[:2]
            path = Path(tmp) / f"stack{depth}.tif"
            tifffile.imwrite(path, image.astype(np.float32), imagej=True, metadata={"axes": "ZYX", "spacing": 2.0},
                             resolution=(1.0, 1.0))
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            times, peaks, error, stats = [], [], None, None
            for index in range(args.repeats):  # each round: a fresh process and a fresh folder
                out = Path(tmp) / f"out{depth}_{index}"
                command = [bioflow, "predict", args.model, str(path), "--out", str(out), "--no-progress",
                           "--tile-size", *map(str, args.tile), "--device", "cpu"]
                if args.project_dir:
                    command += ["--project-dir", args.project_dir]
                start = time.perf_counter()
                process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
                _, status, usage = os.wait4(process.pid, 0)
                times.append(time.perf_counter() - start)
                stderr = process.stderr.read()
                process.stdout.close()
                process.stderr.close()
                if status != 0:
                    error = stderr.strip().splitlines()[-1:]
                    break
                peaks.append(usage.ru_maxrss / 1024)
                if stats is None:
                    predicted = tifffile.imread(next(out.glob("*.tif")))
                    stats = match_instances(labels, predicted, [0.5])[0.5]
                shutil.rmtree(out, ignore_errors=True)
            if error is not None:
                report["stacks"].append({"depth": depth, "error": error})
                continue
            seconds, spread = median_and_spread(times)
            report["stacks"].append({
                "depth": depth, "voxels": int(labels.size), "seconds": seconds, "seconds_spread": spread,
                "peak_rss_mib": round(max(peaks), 1),
                "label_volume_mib": round(labels.size * 4 / 2**20, 1),
                "true_objects": int(stats.n_true), "predicted_objects": int(stats.n_pred),
                "accuracy@0.5": round(float(stats.accuracy), 4),
            })
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
