"""The worked example of docs/uncertainty.md: a CARE model trained on one kind of structure, applied
to another. What do its uncertainty map, the spread of augmented predictions and the fit check say?

Trains a probabilistic CARE model (``experiment=demo_care task.probabilistic=true``) on generated
nuclei-like blobs only (``data.source.structures=blobs``), then predicts held-out images made the
same way (another seed) of two kinds: blobs, like the training images, and filaments, which the
model has never seen (same microscope: the same blur, photons and read noise). Prints one JSON
object with, per kind, the mean over images of:

- ``psnr`` of the restored image against the clean one (dB, data range 255);
- ``observed_rmse`` (against the clean image) and ``predicted_std`` (the mean of the uncertainty
  image), and their ratio: about 1 where the std is calibrated, above 1 where the model is more
  wrong than it says;
- ``beyond_3_std``: the fraction of pixels whose error exceeds three predicted std;
- ``tta_spread``: the mean spread of the 8 flipped and turned predictions;
- ``fit_flagged`` (fraction of images the fit check flags), ``fit_score`` and the reasons named.

Run:   .venv/bin/python bench/trust_example.py [--images 6]
Smoke: .venv/bin/python bench/trust_example.py --smoke     (tiny sizes, seconds; run by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

SMOKE = ["data.source.n_images=6", "data.source.shape=[64,64]", "data.patch_size=[32,32]", "data.patches_per_epoch=8",
         "data.batch_size=4", "model.depth=1", "model.base_channels=4", "trainer.max_epochs=1"]


def held_out(config: dict, structures: str, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (degraded, clean) pairs as the training source makes them, of ``structures``, another seed."""
    from bioflow.config import component
    from bioflow.registry import registry

    name, kwargs = component(config["data"]["source"])
    kwargs = {**kwargs, "seed": int(kwargs.get("seed", 0)) + 1000, "n_images": n, "structures": structures}
    return [(np.asarray(r.image, np.float32), np.asarray(r.target, np.float32))
            for r in registry.create("sources", name, **kwargs)]


def measure(model, pairs) -> dict:
    rows = []
    for image, clean in pairs:
        out = model.predict(image[0], tta_spread=True)
        error = out["restored"] - clean
        std = out["uncertainty"]
        rmse = float(np.sqrt(np.mean(error**2)))
        rows.append({
            "psnr": float(10 * np.log10(255.0**2 / max(np.mean(error**2), 1e-12))),
            "observed_rmse": rmse,
            "predicted_std": float(np.mean(std)),
            "observed_over_predicted": rmse / float(np.sqrt(np.mean(std**2))),
            "beyond_3_std": float(np.mean(np.abs(error) > 3 * std)),
            "tta_spread": float(np.mean(out["tta_spread"])),
            "fit_score": float(out["fit"]["score"]),
            "fit_flagged": float(not out["fit"]["fits"]),
            "reason": out["fit"]["reason"],
        })
    summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "reason"}
    summary["reasons"] = dict(Counter(r["reason"] for r in rows if r["reason"]))
    return summary


def main(argv: list[str] | None = None) -> dict:
    import bioflow

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6, help="held-out images of each kind")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the bench runs")
    parser.add_argument("--project-dir", default=None)
    args = parser.parse_args(argv)
    project = Path(args.project_dir or tempfile.mkdtemp(prefix="bioflow-trust-"))
    overrides = ["experiment=demo_care", "task.probabilistic=true", "data.source.structures=blobs", f"project_dir={project}",
                 "logger.experiment_name=trust_example", "trainer.enable_progress_bar=false", *(SMOKE if args.smoke else [])]
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON only
        summary = bioflow.train(overrides)
    model = bioflow.load_model(summary["run_id"], project_dir=str(project))
    n = 2 if args.smoke else args.images
    result = {"overrides": overrides, "trained_on": "blobs",
              "threshold": model.task.fit_reference.threshold,
              **{kind: measure(model, held_out(model.task.config, kind, n)) for kind in ("blobs", "filaments")}}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
