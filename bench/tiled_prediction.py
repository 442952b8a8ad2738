"""Tiled prediction throughput and peak memory of `bioflow predict`.

U-Net of depth 2 with 32 base channels (2D, random weights: speed does not depend on training),
tile 256, overlap = the receptive field (44 px), on uint16 images of the given sizes; variants:
cosine blending, no blending (hard cut in each overlap), and cosine blending with test-time
augmentation (8 flips/rotations). Each measurement runs in a fresh process, which reports the wall
time of the prediction itself and its peak resident memory; each size and variant is measured
``--repeats`` times (default 3), each time in a fresh process writing to a fresh folder. Prints one
JSON object: per size and variant, ``seconds`` is the median of the rounds (``megapixels_per_s``
the throughput at that median time), ``seconds_spread`` gives the fastest and slowest round and
every round's time, and ``peak_rss_mib`` is the largest peak memory of the rounds.

Run:   .venv/bin/python bench/tiled_prediction.py [--sizes 1024 8192] [--variants cosine none tta] [--repeats 3]
Smoke: .venv/bin/python bench/tiled_prediction.py --smoke     (tiny sizes, seconds; run by the tests)

``--smoke`` predicts one 300 x 300 image (four tiles of 256) with each variant, once (``--repeats 1``:
the median is that one time), each in its fresh process as in a full run, with a U-Net of 8 base
channels on 2 threads at most, the jobs recorded in one MLflow store (a full run: one per
measurement): the figures mean nothing, the JSON has the same structure plus ``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
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


def median_and_spread(values: list[float], digits: int = 2) -> tuple[float, dict]:
    """The median of the rounds, and their spread: fastest, slowest and every round (rounded)."""
    return round(statistics.median(values), digits), {
        "min": round(min(values), digits), "max": round(max(values), digits),
        "rounds": [round(v, digits) for v in values]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--variants", nargs="+", default=["cosine", "none", "tta"], choices=["cosine", "none", "tta"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh processes per size and variant; the median time is reported (default 3)")
    parser.add_argument("--smoke", action="store_true", help="one tiny image, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    channels = 32
    if args.smoke:
        args.sizes, args.threads, channels, args.repeats = [300], min(args.threads, 2), 8, 1
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

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
                shared = [str(tmp / "project")] if args.smoke else []  # one store to create, not three
                rounds = []
                for index in range(args.repeats):  # each round: a fresh process and a fresh folder
                    out = tmp / f"out_{size}_{variant}_{index}"
                    proc = subprocess.run(
                        [sys.executable, "-c", CHILD, str(model), str(image), str(out), variant, args.device,
                         str(args.threads), *shared],
                        capture_output=True, text=True,
                    )
                    if proc.returncode != 0:
                        raise SystemExit(proc.stderr)
                    rounds.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    shutil.rmtree(out, ignore_errors=True)  # the outputs of a large image add up
                seconds, spread = median_and_spread([r["seconds"] for r in rounds])
                median_s = statistics.median(r["seconds"] for r in rounds)
                results.append({
                    "size": f"{size}x{size}", "variant": variant, "seconds": seconds, "seconds_spread": spread,
                    "megapixels_per_s": round(size * size / median_s / 1e6, 3),
                    "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rounds), 1),
                })
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    report = {
        "benchmark": "tiled_prediction", "model": f"unet depth=2 base_channels={channels} (2D)", "tile": 256,
        "overlap": 44, "batch_size": 4, "device": args.device, "threads": args.threads, "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(), "results": results,
    }
    if args.smoke:
        report["smoke"] = True
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
