"""Class imbalance: weighted sampling versus uniform sampling at the same training budget.

Trains `experiment=imbalance` (synthetic nuclei with a rare kind covering under 2% of the pixels;
3-class U-Net) with `sampler=uniform` and with `sampler=class_weighted`, for each seed, through the
real `bioflow train` command, and reads the test-split scores of every run from MLflow. Prints one
JSON object: the rare class's pixel share, and per sampler the test IoU and Dice of the rare class
and of the common nuclei per seed, with means and standard deviations.

Run:   .venv/bin/python bench/imbalance.py [--seeds 0 1 2] [--project-dir /tmp/bioflow-imbalance]
Smoke: .venv/bin/python bench/imbalance.py --smoke     (tiny sizes, seconds; run by the tests)

``--smoke`` trains each sampler once (the first seed) on 6 images of 64 x 64 (a rare fraction of
0.3, so that they have rare nuclei) for 2 steps (patch 32, batch 4, U-Net depth 1, width 4), in
this process through ``bioflow.train`` with the same overrides as the ``bioflow train`` command
(two interpreter start-ups saved), and reads the scores from MLflow as a full run does: the
scores mean nothing, the JSON has the same structure plus ``"smoke": true``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Tiny data (with more of the rare kind, so that the few images have some) and a tiny network.
SMOKE = ["data.source.n_images=6", "data.source.shape=[64,64]", "data.source.rare_fraction=0.3",
         "data.patch_size=[32,32]", "data.patches_per_epoch=8", "data.batch_size=4", "model.depth=1",
         "model.base_channels=4", "trainer.max_epochs=1"]


def rare_pixel_share(overrides: list[str] = ()) -> float:
    """Share of rare-class pixels in the experiment's data (generated as the experiment does)."""
    from bioflow.data.sources import synthetic_nuclei
    from bioflow.testing import compose_config

    # the experiment's data source as `bioflow train experiment=imbalance` composes it (its data
    # config, synthetic_rare_nuclei, sets the rare kind over synthetic_nuclei's defaults)
    source = compose_config("experiment=imbalance", *overrides)["data"]["source"]
    kwargs = {k: v for k, v in source.items() if k != "name"}
    records = synthetic_nuclei(**kwargs)
    return float(np.mean([(r.target == 2).mean() for r in records]))


def train(overrides: list[str], in_process: bool) -> None:
    """``bioflow train <overrides>``: the command in a fresh process, or ``bioflow.train`` here."""
    if in_process:
        import bioflow

        with contextlib.redirect_stdout(sys.stderr):  # the training's own report; stdout is for the JSON
            bioflow.train(overrides)
        return
    bioflow = str(Path(sys.executable).with_name("bioflow"))
    subprocess.run([bioflow, "train", *overrides], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["uniform", "class_weighted"])
    parser.add_argument("--project-dir", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    extra = SMOKE if args.smoke else []
    if args.smoke:
        args.seeds = args.seeds[:1]
    from mlflow.tracking import MlflowClient

    project = Path(args.project_dir or tempfile.mkdtemp(prefix="bioflow-imbalance-"))
    results: dict[str, dict[str, list[float]]] = {}
    budget = None
    for sampler in args.samplers:
        scores: dict[str, list[float]] = {"iou_rare": [], "dice_rare": [], "iou_nucleus": []}
        for seed in args.seeds:
            name = f"imbalance_{sampler}_{seed}"
            train(["experiment=imbalance", f"sampler={sampler}", f"seed={seed}", f"logger.experiment_name={name}",
                   f"project_dir={project}", "trainer.enable_progress_bar=false", *extra], in_process=args.smoke)
            client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
            run = client.search_runs([client.get_experiment_by_name(name).experiment_id])[0]
            params = run.data.params
            budget = (f"{params.get('trainer.max_epochs')} epochs x {params.get('data.patches_per_epoch')} patches "
                      f"(batch {params.get('data.batch_size')})")
            for key in scores:
                scores[key].append(round(run.data.metrics.get(f"test/{key}", 0.0), 4))
            print(json.dumps({"sampler": sampler, "seed": seed, **{k: v[-1] for k, v in scores.items()}}),
                  file=sys.stderr, flush=True)
        results[sampler] = {
            **scores,
            **{f"{k}_mean": round(statistics.mean(v), 4) for k, v in scores.items()},
            **{f"{k}_sd": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0 for k, v in scores.items()},
        }
    if args.project_dir is None:
        shutil.rmtree(project, ignore_errors=True)
    report = {"benchmark": "imbalance", "rare_pixel_share": round(rare_pixel_share(extra), 4),
              "seeds": args.seeds, "budget": budget, "results": results}
    if args.smoke:
        report["smoke"] = True
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
