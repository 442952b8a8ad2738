"""Class imbalance: weighted sampling versus uniform sampling at the same training budget.

Trains `experiment=imbalance` (synthetic nuclei with a rare kind covering under 2% of the pixels;
3-class U-Net) with `sampler=uniform` and with `sampler=class_weighted`, for each seed, through the
real `bioflow train` command, and reads the test-split scores of every run from MLflow. Prints one
JSON object: the rare class's pixel share, and per sampler the test IoU and Dice of the rare class
and of the common nuclei per seed, with means and standard deviations.

Run: .venv/bin/python bench/imbalance.py [--seeds 0 1 2] [--project-dir /tmp/bioflow-imbalance]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def rare_pixel_share() -> float:
    """Share of rare-class pixels in the experiment's data (generated as the experiment does)."""
    from omegaconf import OmegaConf

    from bioflow.data.sources import synthetic_nuclei

    root = Path(__file__).resolve().parents[1] / "configs"
    source = OmegaConf.merge(OmegaConf.load(root / "data" / "synthetic_nuclei.yaml").source,
                             OmegaConf.load(root / "experiment" / "imbalance.yaml").data.source)
    kwargs = {k: v for k, v in OmegaConf.to_container(source).items() if k != "name"}
    records = synthetic_nuclei(**kwargs)
    return float(np.mean([(r.target == 2).mean() for r in records]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["uniform", "class_weighted"])
    parser.add_argument("--project-dir", default=None)
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    project = Path(args.project_dir or tempfile.mkdtemp(prefix="bioflow-imbalance-"))
    bioflow = str(Path(sys.executable).with_name("bioflow"))
    results: dict[str, dict[str, list[float]]] = {}
    budget = None
    for sampler in args.samplers:
        scores: dict[str, list[float]] = {"iou_rare": [], "dice_rare": [], "iou_nucleus": []}
        for seed in args.seeds:
            name = f"imbalance_{sampler}_{seed}"
            subprocess.run(
                [bioflow, "train", "experiment=imbalance", f"sampler={sampler}", f"seed={seed}",
                 f"logger.experiment_name={name}", f"project_dir={project}", "trainer.enable_progress_bar=false"],
                check=True, capture_output=True,
            )
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
    print(json.dumps({"benchmark": "imbalance", "rare_pixel_share": round(rare_pixel_share(), 4),
                      "seeds": args.seeds, "budget": budget, "results": results}, indent=1))


if __name__ == "__main__":
    main()
