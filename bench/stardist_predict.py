"""End-to-end StarDist prediction of a large synthetic image: tiles, global NMS, rendering.

Needs a trained StarDist model (a checkpoint file or an MLflow run id), e.g. from
`bioflow train experiment=demo_stardist`. Generates a synthetic nuclei image (default 2048x2048),
predicts it tile by tile, gathers the candidates of all tiles into one global NMS, renders the
labels, and prints one JSON object with the time of each stage, the candidate and object counts,
the matching accuracy against the generated labels, and the peak resident memory.

Run: .venv/bin/python bench/stardist_predict.py --model <checkpoint or run id> [--size 2048] [--project-dir bioflow-runs]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--project-dir", default="bioflow-runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from bioflow.checkpoint import load_model
    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
    from bioflow.metrics.matching import match_instances
    from bioflow.prediction import choose_device
    from bioflow.tracking.store import Store

    image, truth = synthetic_nuclei_image((args.size, args.size), seed=123, index=0)
    task = load_model(args.model, Store.create(args.project_dir)).task
    device = choose_device(args.device)
    task.to(device)
    session = task.prediction_session(image.shape)
    start = time.perf_counter()
    with torch.no_grad():
        task.predict_array(image[None], sink=session.block, tile_size=[args.tile])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    network_s = time.perf_counter() - start
    candidates = int(sum(len(p) for p in session.probs))
    start = time.perf_counter()
    labels = session.finish()["labels"]
    nms_render_s = time.perf_counter() - start
    stats = match_instances(truth, labels, [0.5])[0.5]
    print(json.dumps({
        "benchmark": "stardist_predict", "size": f"{args.size}x{args.size}", "tile": args.tile, "device": device,
        "threads": torch.get_num_threads(), "network_and_candidates_s": round(network_s, 2),
        "nms_and_render_s": round(nms_render_s, 2), "total_s": round(network_s + nms_render_s, 2),
        "candidates": candidates, "objects_true": stats.n_true, "objects_found": stats.n_pred,
        "accuracy@0.5": round(stats.accuracy, 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "thresholds": [round(float(t), 3) for t in task.thresholds],
    }, indent=1))


if __name__ == "__main__":
    main()
