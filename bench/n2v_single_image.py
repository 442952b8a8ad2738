"""Noise2Void on one noisy image, the way a user runs it: one TIFF file in, denoised TIFF out.

For each content, a clean 512 x 512 image (0-255 scale) gets Gaussian noise of sigma 25; only
the noisy image is written to a TIFF file and given to
``bioflow train experiment=n2v_own_data data.source.images=<file>`` (validation from a held-out
region of that image), trained for ``--steps`` steps (batch 16, patch 64), then
``bioflow predict <run> <file>`` denoises the whole image. Reports the PSNR of the noisy and of
the denoised image against the clean one, per seed. Contents: ``nuclei`` (the real nuclei image
shipped with the stardist package, when an interpreter with it is given by
``--stardist-python`` or importable here), ``blobs`` and ``mixed`` (generated). Prints one JSON
object.

Run:   .venv/bin/python bench/n2v_single_image.py [--steps 200] [--seeds 0 1] [--stardist-python PY]
Smoke: .venv/bin/python bench/n2v_single_image.py --smoke     (tiny sizes, seconds; run by the tests)

``--smoke`` runs every content at 96 x 96 (the nuclei image cropped; skipped, as in a full run,
when no interpreter has the stardist package) with the first seed only, 2 training steps of batch
4, patch 32, U-Net depth 1, width 8: the PSNRs mean nothing, the JSON has the same structure plus
``"smoke": true``. ``--project-dir`` keeps the MLflow store there (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIGMA, SIZE = 25.0, 512
SMOKE_SIZE = 96
# Training overrides of a smoke run (after the bench's own): 2 steps of a tiny network.
SMOKE = ["data.patches_per_epoch=8", "data.batch_size=4", "data.patch_size=[32,32]", "model.depth=1",
         "model.base_channels=8"]

NUCLEI_SCRIPT = r"""
import sys, numpy as np
from stardist.data import test_image_nuclei_2d
np.save(sys.argv[1], test_image_nuclei_2d())
"""


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def clean_image(content: str, python: str | None, size: int = SIZE) -> np.ndarray | None:
    if content == "nuclei":
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "nuclei.npy"
            for py in filter(None, (sys.executable, python)):
                if subprocess.run([py, "-c", NUCLEI_SCRIPT, str(target)], capture_output=True, cwd=tmp).returncode == 0:
                    image = np.load(target).astype(np.float64)
                    if size != SIZE:  # a smoke run: a crop
                        image = image[:size, :size]
                    return 255.0 * (image - image.min()) / (image.max() - image.min())
        return None
    from bioflow.data.synthetic_restoration import synthetic_restoration_pair

    _, clean = synthetic_restoration_pair((size, size), seed=7, index=0, noise="gaussian", sigma=SIGMA, blur=0.0,
                                          peak=255.0, structures=content)
    return clean.astype(np.float64)


def run(content: str, clean: np.ndarray, steps: int, seed: int, work: Path, project: Path | None = None,
        extra: list[str] = ()) -> dict:
    import tifffile

    import bioflow

    project = project or work / "project"
    rng = np.random.default_rng(1000 + seed)
    noisy = (clean + rng.normal(0, SIGMA, clean.shape)).astype(np.float32)
    folder = work / f"{content}_s{seed}"
    folder.mkdir(parents=True)
    tifffile.imwrite(folder / "noisy.tif", noisy)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the training's own report; stdout is for the JSON
        summary = bioflow.train([
            "experiment=n2v_own_data", f"data.source.images={folder / 'noisy.tif'}", f"seed={seed}",
            f"trainer.max_epochs={max(1, steps // 100)}", "data.patches_per_epoch=1600", "data.num_workers=0",
            f"project_dir={project}", "trainer.enable_progress_bar=false", *extra,
        ])
    train_s = time.perf_counter() - start
    with contextlib.redirect_stdout(sys.stderr):
        written = bioflow.predict(summary["run_id"], [folder / "noisy.tif"], folder / "denoised",
                                  project_dir=project)
    denoised = tifffile.imread(written[0]["restored"])
    return {"noisy_psnr": psnr(noisy, clean), "denoised_psnr": psnr(denoised, clean),
            "gain_db": psnr(denoised, clean) - psnr(noisy, clean), "train_s": train_s,
            "steps": summary["performance"].get("steps")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--contents", nargs="+", default=["nuclei", "blobs", "mixed"])
    parser.add_argument("--stardist-python", help="interpreter with the stardist package (for the nuclei image)")
    parser.add_argument("--project-dir", help="MLflow store of the runs (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    size, extra = (SMOKE_SIZE, SMOKE) if args.smoke else (SIZE, [])
    if args.smoke:
        args.steps, args.seeds = 2, args.seeds[:1]
    project = Path(args.project_dir) if args.project_dir else None
    report: dict = {"benchmark": "n2v_single_image", "size": size, "sigma": SIGMA, "steps": args.steps, "contents": {}}
    if args.smoke:
        report["smoke"] = True
    with tempfile.TemporaryDirectory() as tmp:
        for content in args.contents:
            clean = clean_image(content, args.stardist_python, size)
            if clean is None:
                report["contents"][content] = {"skipped": "no stardist package for the nuclei image"}
                continue
            runs = {str(s): run(content, clean, args.steps, s, Path(tmp), project, extra) for s in args.seeds}
            gains = [r["gain_db"] for r in runs.values()]
            report["contents"][content] = {"runs": runs, "mean_gain_db": float(np.mean(gains)), "min_gain_db": float(min(gains))}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
