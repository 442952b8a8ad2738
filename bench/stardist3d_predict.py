"""StarDist 3D prediction of stacks larger than one tile: time, peak memory and accuracy by depth.

Generates synthetic stacks of nuclei (z step twice the pixel size) of several depths at a fixed
width, writes each as a TIFF and runs ``bioflow predict <model> stack.tif --tile-size ...`` on it
in a fresh process (tiles, one global 3D NMS over the candidates of every tile, rendering). For
each depth: wall seconds, the process's peak RSS, the label volume's own size (int32), the number
of objects and accuracy@0.5 against the generated labels. Peak RSS minus the label volume is what
the tiles and candidates cost; at a fixed tile it should stay flat as the depth grows.

Run (a model trained by ``bioflow train experiment=demo_stardist3d``)::

    .venv/bin/python bench/stardist3d_predict.py --model <checkpoint or run id> --depths 48 96 192

Prints one JSON object.

Smoke (seconds; run by the tests)::

    .venv/bin/python bench/stardist3d_predict.py --smoke

predicts one 16 x 48 x 48 stack with tile 8 x 32 x 32 (several tiles, one global NMS) in a fresh
``bioflow predict`` process, with ``--model`` or else an untrained tiny StarDist 3D checkpoint
(random weights: the objects and the accuracy mean nothing); the job is recorded under
``--project-dir``, else in the temporary folder. The JSON has the same structure plus
``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# A tiny StarDist 3D network for a smoke run without --model (random weights).
SMOKE_MODEL = ["experiment=demo_stardist3d", "model.depth=1", "model.base_channels=4", "task.n_rays=16",
               "task.stem_channels=4", "task.features=4", "task.head_features=8"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint file or run id of a StarDist 3D model (required but with --smoke)")
    parser.add_argument("--depths", type=int, nargs="+", default=[48, 96, 192])
    parser.add_argument("--width", type=int, default=192, help="Y and X of the stacks")
    parser.add_argument("--tile", type=int, nargs=3, default=[32, 128, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--project-dir", help="where the model's run is stored (for a run id)")
    parser.add_argument("--smoke", action="store_true", help="one tiny stack, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    if not args.model and not args.smoke:
        parser.error("the following arguments are required: --model")
    if args.smoke:
        args.depths, args.width, args.tile, args.threads = [16], 48, [8, 32, 32], min(args.threads, 2)

    import tifffile

    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
    from bioflow.metrics.matching import match_instances

    bioflow = str(Path(sys.executable).with_name("bioflow"))
    report = {"benchmark": "stardist3d_predict", "model": args.model, "width": args.width, "tile": args.tile,
              "threads": args.threads, "stacks": []}
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
            out = Path(tmp) / f"out{depth}"
            command = [bioflow, "predict", args.model, str(path), "--out", str(out), "--no-progress",
                       "--tile-size", *map(str, args.tile), "--device", "cpu"]
            if args.project_dir:
                command += ["--project-dir", args.project_dir]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            start = time.perf_counter()
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(process.pid, 0)
            seconds = time.perf_counter() - start
            stderr = process.stderr.read()
            if status != 0:
                report["stacks"].append({"depth": depth, "error": stderr.strip().splitlines()[-1:]})
                continue
            predicted = tifffile.imread(next(out.glob("*.tif")))
            stats = match_instances(labels, predicted, [0.5])[0.5]
            report["stacks"].append({
                "depth": depth, "voxels": int(labels.size), "seconds": round(seconds, 2),
                "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
                "label_volume_mib": round(labels.size * 4 / 2**20, 1),
                "true_objects": int(stats.n_true), "predicted_objects": int(stats.n_pred),
                "accuracy@0.5": round(float(stats.accuracy), 4),
            })
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
