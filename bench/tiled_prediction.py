"""Tiled prediction throughput and peak memory of `bioflow predict`.

U-Net of depth 2 with 32 base channels (2D, random weights: speed does not depend on training),
tile 256, overlap = the receptive field (44 px), on uint16 images of the given sizes; variants:
cosine blending, no blending (hard cut in each overlap), and cosine blending with test-time
augmentation (8 flips/rotations). Each measurement runs in a fresh process, which reports the wall
time of the prediction itself and its peak resident memory. Prints one JSON object.

Run:   .venv/bin/python bench/tiled_prediction.py [--sizes 1024 8192] [--variants cosine none tta]
Smoke: .venv/bin/python bench/tiled_prediction.py --smoke     (tiny sizes, seconds; run by the tests)

``--smoke`` predicts one 300 x 300 image (four tiles of 256) with each variant, each in its fresh
process as in a full run, with a U-Net of 8 base channels on 2 threads at most, the jobs recorded in
one MLflow store (a full run: one per measurement): the figures mean nothing, the JSON has the
same structure plus ``"smoke": true``.
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

CHILD = r"""
import json, resource, sys, time
from bioflow.prediction import predict
model, image, out, variant, device, threads = sys.argv[1:7]
project = sys.argv[7] if len(sys.argv) > 7 else out  # where the job is recorded
import torch
torch.set_num_threads(int(threads))
start = time.perf_counter()
predict(model, [image], out, project_dir=project, tile_size=[256], batch_size=4, tta=variant == "tta",
        blend="none" if variant == "none" else "cosine", device=device, progress=False)
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--variants", nargs="+", default=["cosine", "none", "tta"], choices=["cosine", "none", "tta"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--smoke", action="store_true", help="one tiny image, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    channels = 32
    if args.smoke:
        args.sizes, args.threads, channels = [300], min(args.threads, 2), 8

    import numpy as np
    import tifffile

    from bioflow.testing import make_checkpoint

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_checkpoint(tmp / "unet.ckpt", "model.depth=2", f"model.base_channels={channels}")
        for size in args.sizes:
            image = tmp / f"image_{size}.tif"
            rng = np.random.default_rng(0)
            data = np.empty((size, size), np.uint16)
            for row in range(0, size, 1024):  # written in bands: the benchmark itself stays small
                data[row:row + 1024] = rng.integers(0, 4000, (min(1024, size - row), size), dtype=np.uint16)
            tifffile.imwrite(image, data)
            del data
            for variant in args.variants:
                out = tmp / f"out_{size}_{variant}"
                shared = [str(tmp / "project")] if args.smoke else []  # one store to create, not three
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, str(model), str(image), str(out), variant, args.device,
                     str(args.threads), *shared],
                    capture_output=True, text=True,
                )
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr)
                measured = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append({
                    "size": f"{size}x{size}", "variant": variant, "seconds": round(measured["seconds"], 2),
                    "megapixels_per_s": round(size * size / measured["seconds"] / 1e6, 3),
                    "peak_rss_mib": round(measured["peak_rss_mib"], 1),
                })
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = {
        "benchmark": "tiled_prediction", "model": f"unet depth=2 base_channels={channels} (2D)", "tile": 256,
        "overlap": 44, "batch_size": 4, "device": args.device, "threads": args.threads,
        "machine": platform.processor() or platform.machine(), "results": results,
    }
    if args.smoke:
        report["smoke"] = True
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
