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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint file or run id of a StarDist 3D model")
    parser.add_argument("--depths", type=int, nargs="+", default=[48, 96, 192])
    parser.add_argument("--width", type=int, default=192, help="Y and X of the stacks")
    parser.add_argument("--tile", type=int, nargs=3, default=[32, 128, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--project-dir", help="where the model's run is stored (for a run id)")
    args = parser.parse_args()

    import tifffile

    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
    from bioflow.metrics.matching import match_instances

    bioflow = str(Path(sys.executable).with_name("bioflow"))
    report = {"benchmark": "stardist3d_predict", "model": args.model, "width": args.width, "tile": args.tile,
              "threads": args.threads, "stacks": []}
    with tempfile.TemporaryDirectory() as tmp:
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


if __name__ == "__main__":
    main()
