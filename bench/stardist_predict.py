"""End-to-end StarDist prediction of a large image: network, global NMS, rendering; bioflow and the reference.

Needs a trained bioflow StarDist model (a checkpoint file or an MLflow run id), e.g. from
`bioflow train experiment=stardist_own_data ...` or the workdir of bench/stardist_real.py. The
image: by default the real nuclei image of the stardist package tiled 4 x 4 into 2048 x 2048
(``--image real``, needs ``--reference-python`` or a stardist package here), or a generated one
(``--image synthetic``). bioflow predicts it tile by tile (tile ``--tile``, default automatic), gathers the candidates
of all tiles into one global NMS and renders the labels. With ``--reference-python`` and
``--reference-model`` (a StarDist2D model folder, e.g. ``<workdir>/reference_s1_500/ref_seed1``)
the reference's ``predict_instances`` (network + NMS + rendering) predicts the same normalised
image in the same run, with the same number of threads. Prints one JSON object: seconds per stage,
candidates, objects, accuracy against the labels, peak memory.

Every time is the median of ``--repeats`` rounds (default 3), each a whole prediction of the image
(bioflow: network and candidates, then global NMS and rendering, in this process; the reference:
``predict_instances`` in its own process, after its warm-up call): ``network_and_candidates_s``,
``nms_and_render_s`` and ``total_s`` (the median of the rounds' totals), each with a ``<key>_spread``
beside it giving the fastest and slowest round and every round's time; the time ratio is that of the
medians. Candidates, objects and accuracy are those of the last round (the rounds predict the same).

Run:   .venv/bin/python bench/stardist_predict.py --model <ckpt or run id> [--project-dir DIR]
           [--reference-python PY --reference-model DIR] [--threads 2] [--repeats 3]
Smoke: .venv/bin/python bench/stardist_predict.py --smoke     (seconds; run by the tests)

``--smoke`` predicts, in two rounds (``--repeats 2``), a 128 x 128 image (the real one when the stardist package is at hand, else a
generated one, the JSON saying the real one was skipped) with ``--model`` or else an untrained tiny
StarDist checkpoint (random weights: objects and accuracy mean nothing); the reference runs only
with ``--reference-python`` and ``--reference-model``, else the JSON says it was skipped. The JSON
has the same structure plus ``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/stardist_real.py

REFERENCE_SCRIPT = r"""
import json, statistics, sys, time
args = json.loads(sys.argv[1])
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(args["threads"])
tf.config.threading.set_inter_op_parallelism_threads(args["threads"])
from stardist.models import StarDist2D
from pathlib import Path
folder = Path(args["model"])
model = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
image = np.load(args["image"])
model.predict_instances(image[:256, :256])  # warm-up: graph building
rounds = []
for _ in range(args["repeats"]):
    start = time.perf_counter()
    labels, details = model.predict_instances(image)
    rounds.append(time.perf_counter() - start)
np.save(args["out"], labels.astype(np.int32))
print(json.dumps({"total_s": statistics.median(rounds), "total_s_rounds": rounds, "objects_found": int(labels.max()),
                  "thresholds": [float(model.thresholds.prob), float(model.thresholds.nms)]}))
"""


# A tiny StarDist network for a smoke run without --model (random weights).
SMOKE_MODEL = ["experiment=demo_stardist", "model.depth=1", "model.base_channels=4", "task.head_features=8",
               "task.n_rays=16"]


def load_image(kind: str, size: int, python: str | None, required: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
    """The image and its labels; None when the real one is not at hand and not ``required``."""
    if kind == "synthetic":
        from bioflow.data.synthetic_nuclei import synthetic_nuclei_image

        return synthetic_nuclei_image((size, size), seed=123, index=0)
    from stardist_real import stardist_nuclei  # bench/stardist_real.py

    found = stardist_nuclei(python)
    if found is None:
        if not required:
            return None
        sys.exit("stardist_predict: --image real needs the stardist package (give --reference-python)")
    image, labels = found[0], found[1].astype(np.int64)
    reps = -(-size // image.shape[0])
    tiled = np.tile(image, (reps, reps))[:size, :size]
    # tiles of the label image need distinct ids
    blocks = [[np.where(labels > 0, labels + (i * reps + j) * (labels.max() + 1), 0) for j in range(reps)] for i in range(reps)]
    return tiled, np.block(blocks)[:size, :size]


def median_and_spread(values: list[float], digits: int = 2) -> tuple[float, dict]:
    """The median of the rounds, and their spread: fastest, slowest and every round (rounded)."""
    return round(statistics.median(values), digits), {
        "min": round(min(values), digits), "max": round(max(values), digits),
        "rounds": [round(v, digits) for v in values]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint file or run id (required but with --smoke)")
    parser.add_argument("--image", choices=["real", "synthetic"], default="real")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=0, help="tile size (default 0: automatic, as bioflow predict)")
    parser.add_argument("--project-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed", "auto"], default=None,
                        help="bioflow's network precision (as bioflow predict --precision; default: the model's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="whole predictions of the image per side; the median times are reported (default 3)")
    parser.add_argument("--reference-python")
    parser.add_argument("--reference-model")
    parser.add_argument("--smoke", action="store_true", help="a tiny image, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    if not args.model and not args.smoke:
        parser.error("the following arguments are required: --model")
    if args.smoke:
        args.size, args.threads, args.repeats = 128, min(args.threads, 2), 2
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    from bioflow.loading import load_model
    from bioflow.metrics.matching import match_instances
    from bioflow.prediction import choose_device
    from bioflow.tracking.store import Store, default_project_dir

    skipped = {}
    found = load_image(args.image, args.size, args.reference_python, required=not args.smoke)
    if found is None:  # a smoke run without the stardist package: a generated image instead
        skipped["real_image"] = {"skipped": "no stardist package for the real image: a generated one instead"}
        args.image = "synthetic"
        found = load_image(args.image, args.size, args.reference_python)
    image, truth = found
    tmp = tempfile.TemporaryDirectory() if args.smoke else None
    if args.smoke and not args.model:
        from bioflow.testing import make_checkpoint

        args.model = str(make_checkpoint(Path(tmp.name) / "stardist.ckpt", *SMOKE_MODEL))
    task = load_model(args.model, Store.create(args.project_dir or default_project_dir()), inference=True,
                      explicit_store=args.project_dir is not None).task
    device = choose_device(args.device)
    if args.precision:
        task.context.predict["precision"] = args.precision
    task.to(device)
    norm = task.normalizer().norm_for(image[None])
    network_rounds, nms_rounds = [], []
    for _ in range(args.repeats):  # each round: the whole prediction again, in a new session
        labels = None  # the last round's labels are freed before the next round
        session = task.prediction_session(image.shape)
        start = time.perf_counter()
        with torch.no_grad():
            task.predict_array(image[None], sink=session.block, tile_size=[args.tile] if args.tile else None)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        network_rounds.append(time.perf_counter() - start)
        candidates = session.count  # rows appended to the session's candidate file
        start = time.perf_counter()
        labels = np.asarray(session.finish()["labels"])  # rendered strip by strip (Blocks)
        nms_rounds.append(time.perf_counter() - start)
        session.close()
    network_s, network_spread = median_and_spread(network_rounds)
    nms_render_s, nms_render_spread = median_and_spread(nms_rounds)
    total_s, total_spread = median_and_spread([a + b for a, b in zip(network_rounds, nms_rounds)])
    stats = match_instances(truth, labels, [0.5])[0.5]
    report = {
        "benchmark": "stardist_predict", "image": args.image, "size": f"{args.size}x{args.size}", "tile": args.tile or f"automatic ({task.tiling()[0]})",
        "device": device, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "precision": task.context.predict.get("precision", "32-true"),
        "bioflow": {
            "network_and_candidates_s": network_s, "network_and_candidates_s_spread": network_spread,
            "nms_and_render_s": nms_render_s, "nms_and_render_s_spread": nms_render_spread,
            "total_s": total_s, "total_s_spread": total_spread, "candidates": candidates, "objects_true": stats.n_true,
            "objects_found": stats.n_pred, "accuracy@0.5": round(stats.accuracy, 4),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "thresholds": [round(float(t), 3) for t in task.thresholds],
        },
    }
    if args.smoke:
        report.update(smoke=True, **skipped)
        if not (args.reference_python and args.reference_model):
            report["reference"] = {"skipped": "no --reference-python and --reference-model"}
    if args.reference_python and args.reference_model:
        with tempfile.TemporaryDirectory() as ref_tmp:
            normalised = Path(ref_tmp) / "image.npy"
            np.save(normalised, norm(image[None])[0])  # the same input as bioflow's network saw
            out = Path(ref_tmp) / "labels.npy"
            payload = {"model": args.reference_model, "image": str(normalised), "out": str(out), "threads": args.threads,
                       "repeats": args.repeats}
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TF_CPP_MIN_LOG_LEVEL": "2"}
            done = subprocess.run([args.reference_python, "-c", REFERENCE_SCRIPT, json.dumps(payload)],
                                  capture_output=True, text=True, env=env)
            if done.returncode != 0:
                report["reference"] = {"error": done.stderr.strip().splitlines()[-1:]}
            else:
                ref = json.loads(done.stdout.strip().splitlines()[-1])
                ref_stats = match_instances(truth, np.load(out), [0.5])[0.5]
                ref.update(objects_true=ref_stats.n_true, **{"accuracy@0.5": round(ref_stats.accuracy, 4)})
                ref["total_s"], ref["total_s_spread"] = median_and_spread(ref.pop("total_s_rounds"))
                report["reference"] = ref
                report["time_ratio_bioflow_over_reference"] = round(report["bioflow"]["total_s"] / max(ref["total_s"], 1e-9), 3)
    if tmp is not None:
        tmp.cleanup()
    torch.set_num_threads(threads)  # as it was (main may run in-process, e.g. in the tests)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
