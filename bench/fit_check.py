"""Does the fit check tell shifted inputs from unshifted ones? ROC AUC and flag rates per shift.

For each experiment, trains the model through ``bioflow.train``, generates held-out images as its
data source does (another seed), and shifts copies of them after acquisition:

- ``intensity_x4`` / ``intensity_x0.25``: the pixel values scaled (invisible to a model that
  normalises each image by its own percentiles, the default; visible with
  ``data.normalize.mode=dataset``);
- ``noise_x3``: three times the noise (restoration pairs: the clean image plus three times the
  degradation; images without a clean version: Gaussian noise of sqrt(8) times the image's own
  pixel noise added, so that the noise's std is three times the image's);
- ``pixel_size_x2`` / ``pixel_size_x0.5``: resampled by 2 (cropped back) and by 0.5 (linear), the
  metadata not saying so; for 0.5, a field twice as wide around the image where the bench has one
  (the real image), so that the shifted image has the unshifted one's size; else the image itself
  (half its size then);
- ``content``: a textured image of another kind (sinusoid gratings with noise) at the same
  intensity range.

Prints one JSON object: per experiment, the fraction of unshifted images flagged, and per shift the
ROC AUC of the score (shifted against unshifted) and the fraction flagged at the stored threshold;
and the seconds per image of prediction alone and with the check (which rides along on the
prediction's own tiles), median over the held-out images, and the check's overhead: as the
difference of the two (noisy: two runs of the same prediction differ by a few percent on a busy
machine) and as the time the check itself spends (timed inside it); the same on
a field 4x4 as large (a mosaic of held-out images), as the check's cost does not grow with the image.

On the real nuclei image of the ``stardist`` package (``--experiments real_nuclei_unet``, with
``--reference-python`` pointing at an interpreter that has the package): a U-Net trained on 8 of
its 16 tiles (128 x 128), validated on 4; the held-out images are the 4 others in their 8 flips
and turns (20 of these 32, seeded), shifted as above; and ``held_out_tiles``: per unseen tile
(held out or validation, as it is) its fit score and verdict and the Dice of the model's
foreground against the annotation, to see whether the tiles flagged are those it does worst on.

Run:   .venv/bin/python bench/fit_check.py [--images 20]
       .venv/bin/python bench/fit_check.py --experiments real_nuclei_unet --reference-python ~/.cache/stardist-ref/bin/python
Smoke: .venv/bin/python bench/fit_check.py --smoke     (tiny sizes, seconds; run by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EXPERIMENTS = {
    "demo_care": [],
    "demo_unet": [],
    "demo_unet_dataset_norm": ["experiment=demo_unet", "data.normalize.mode=dataset"],
}
SMOKE = ["data.source.n_images=6", "data.patch_size=[32,32]", "data.patches_per_epoch=8", "data.batch_size=4",
         "model.depth=1", "model.base_channels=4", "trainer.max_epochs=1"]


def auc(negative: list[float], positive: list[float]) -> float:
    """P(a shifted image scores above an unshifted one), ties counted half."""
    neg, pos = np.asarray(negative)[:, None], np.asarray(positive)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (neg.size * pos.size))


def held_out(config: dict, n: int, shape: list[int] | None) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``n`` images (and clean versions where the source has them) as the source makes them, another seed."""
    from bioflow.config import component
    from bioflow.registry import registry

    name, kwargs = component(config["data"]["source"])
    kwargs = {**kwargs, "seed": int(kwargs.get("seed", 0)) + 1000, "n_images": n}
    if shape is not None:
        kwargs["shape"] = shape
    records = registry.create("sources", name, **kwargs)
    return [(np.asarray(r.image, np.float32), None if r.target is None or np.asarray(r.target).ndim == np.asarray(r.image).ndim - 1
             else np.asarray(r.target, np.float32)) for r in records]


def noise_level(image: np.ndarray) -> float:
    step = np.diff(image, axis=-1)
    return float(1.4826 * np.median(np.abs(step - np.median(step))) / np.sqrt(2))


def shifted(image: np.ndarray, clean: np.ndarray | None, rng, wider: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The shifted versions of one held-out image (``wider``: a field twice as wide around it, or None)."""
    from scipy import ndimage

    spatial = image.shape[1:]
    out = {"intensity_x4": image * 4, "intensity_x0.25": image * 0.25}
    if clean is not None:
        out["noise_x3"] = clean + 3 * (image - clean)
    else:  # independent noise of sqrt(3^2 - 1) times the image's own: three times its noise in all
        sigma = np.sqrt(8.0) * max(noise_level(image), 1e-3 * float(np.ptp(image)))
        out["noise_x3"] = image + rng.normal(0, sigma, image.shape)
    zoomed = ndimage.zoom(image, (1, 2, 2), order=1)
    out["pixel_size_x2"] = zoomed[:, : spatial[0], : spatial[1]]
    out["pixel_size_x0.5"] = ndimage.zoom(image if wider is None else wider, (1, 0.5, 0.5), order=1)
    yy, xx = np.mgrid[: spatial[0], : spatial[1]]
    texture = np.sin(xx / 3.0 + rng.uniform(0, 6)) * np.cos(yy / 5.0) + 0.2 * rng.normal(size=spatial)
    low, high = np.percentile(image, [1, 99])
    out["content"] = (low + (texture - texture.min()) / np.ptp(texture) * (high - low))[None]
    return {k: v.astype(np.float32) for k, v in out.items()}


def measure(experiment: str, overrides: list[str], images: int, shape, project: Path, held=None) -> dict:
    import bioflow
    from bioflow.prediction import predict_array

    with contextlib.redirect_stdout(sys.stderr):
        summary = bioflow.train([*(overrides or [f"experiment={experiment}"]), f"project_dir={project}",
                                 f"logger.experiment_name=fit_{experiment}", "trainer.enable_progress_bar=false",
                                 *([] if shape is None else [f"data.source.shape={shape}"]),
                                 *[o for o in EXTRA if held is None or not o.startswith("data.source.")]])
    model = bioflow.load_model(summary["run_id"], project_dir=str(project))
    task, reference = model.task, model.task.fit_reference
    rng = np.random.default_rng(0)
    scores: dict[str, list[float]] = {"unshifted": []}
    plain_seconds, checked_seconds, check_seconds = [], [], []
    for image, clean, *wider in held if held is not None else held_out(task.config, images, shape):
        for _ in range(2):  # prediction alone and with the check riding along, interleaved; the first warms up
            start = time.perf_counter()
            predict_array(task, image)
            plain = time.perf_counter() - start
            start = time.perf_counter()
            verdict = predict_array(task, image, check_fit=True)["fit"]
            checked = time.perf_counter() - start
        plain_seconds.append(plain)
        checked_seconds.append(checked)
        check_seconds.append(verdict["seconds"])
        scores["unshifted"].append(verdict["score"])
        for name, version in shifted(image, clean, rng, *wider).items():
            scores.setdefault(name, []).append(predict_array(task, version, check_fit=True)["fit"]["score"])
    threshold = reference.threshold
    plain, checked = float(np.median(plain_seconds)), float(np.median(checked_seconds))
    # the same on a field 4x4 as large, a mosaic of the held-out images (the check's cost is fixed)
    images_only = [item[0] for item in (held if held is not None else held_out(task.config, 16, shape))][:16]
    images_only = (images_only * 16)[:16]
    mosaic = np.concatenate([np.concatenate(images_only[r * 4:(r + 1) * 4], axis=2) for r in range(4)], axis=1)
    large_plain, large_checked, large_check = [], [], []
    for _ in range(3):
        start = time.perf_counter()
        predict_array(task, mosaic)
        large_plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        large_check.append(predict_array(task, mosaic, check_fit=True)["fit"]["seconds"])
        large_checked.append(time.perf_counter() - start)
    large = float(np.median(large_plain)), float(np.median(large_checked)), float(np.median(large_check))
    return {
        "threshold": threshold,
        "unshifted_flagged": float(np.mean(np.asarray(scores["unshifted"]) > threshold)),
        "shifts": {name: {"auc": auc(scores["unshifted"], s), "flagged": float(np.mean(np.asarray(s) > threshold))}
                   for name, s in scores.items() if name != "unshifted"},
        "seconds_per_image": {"prediction": plain, "prediction_with_check": checked,
                              "check_itself": float(np.median(check_seconds))},
        "check_overhead": checked / plain - 1.0,
        "check_itself_over_prediction": float(np.median(check_seconds)) / plain,
        "image_shape": list(image.shape),
        "large_image": {"shape": list(mosaic.shape), "prediction": large[0], "prediction_with_check": large[1],
                        "check_itself": large[2], "check_overhead": large[1] / large[0] - 1.0,
                        "check_itself_over_prediction": large[2] / large[0]},
    }


EXTRA: list[str] = []

#: The real image: U-Net (binary) on the nuclei image of the ``stardist`` package, read by this
#: interpreter or by ``--reference-python``; training and validation on regions of it, held-out
#: images cropped from the region left out.
REAL = "real_nuclei_unet"


#: Tiles of the 4 x 4 grid held out and used for validation (the rest train): one of each kind
#: per row and per column, so that no kind holds only one corner of the image.
HELD_TILES = [(0, 1), (1, 3), (2, 0), (3, 2)]
VAL_TILES = [(0, 3), (1, 0), (2, 2), (3, 1)]


def nuclei(reference_python: str | None):
    """The real nuclei image and its labels (bench/stardist_real.py), or None without the package."""
    spec = importlib.util.spec_from_file_location("bench_stardist_real", Path(__file__).with_name("stardist_real.py"))
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    return real.stardist_nuclei(reference_python)


def real_nuclei(reference_python: str | None, folder: Path, crops: int, size: int | None = None):
    """Write the real nuclei image, cut into 4 x 4 tiles, as training (8 tiles) and validation (4)
    images with masks into ``folder``; returns the config overrides and ``crops`` held-out crops
    (seeded; ``size`` None: the 4 tiles left out themselves, flipped and turned, 32 images) of the
    4 tiles left out, or None without the stardist package. The tiles of each kind
    are spread over the image (one of each per row and column where it can), so that no kind holds
    only one corner of it (its regions differ)."""
    import tifffile

    found = nuclei(reference_python)
    if found is None:
        return None
    image, labels = found
    th, tw = image.shape[0] // 4, image.shape[1] // 4
    held_tiles, val_tiles = HELD_TILES, VAL_TILES
    for kind in ("images", "masks"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    held = []
    rng = np.random.default_rng(7)
    for r in range(4):
        for c in range(4):
            box = (slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw))
            if (r, c) in held_tiles:
                tile = image[box].astype(np.float32)
                if size is None:  # whole tiles (the training images' size), in their 8 flips and turns
                    # and the field twice as wide around each (for pixel size x0.5), inside the image
                    y0 = min(max(r * th - th // 2, 0), image.shape[0] - 2 * th)
                    x0 = min(max(c * tw - tw // 2, 0), image.shape[1] - 2 * tw)
                    field = image[y0:y0 + 2 * th, x0:x0 + 2 * tw].astype(np.float32)
                    for k in range(4):
                        for flip in (False, True):
                            turn = lambda a: np.ascontiguousarray(np.rot90(a[:, ::-1] if flip else a, k))[None]  # noqa: E731
                            held.append((turn(tile), None, turn(field)))
                    continue
                for _ in range(max(1, -(-crops // len(held_tiles)))):
                    y, x = (int(rng.integers(0, n - size + 1)) for n in tile.shape)
                    held.append((tile[None, y:y + size, x:x + size].copy(), None))
                continue
            name = f"{'val' if (r, c) in val_tiles else 'train'}_{r}{c}"
            tifffile.imwrite(folder / "images" / f"{name}.tif", np.ascontiguousarray(image[box]))
            tifffile.imwrite(folder / "masks" / f"{name}.tif", np.ascontiguousarray(labels[box]).astype(np.int32))
    held = [held[i] for i in np.random.default_rng(3).permutation(len(held))[:crops]]
    val = ",".join(f"val_{r}{c}" for r, c in val_tiles)
    overrides = ["data=tiff_folder", f"data.source.images={folder / 'images'}", f"data.source.masks={folder / 'masks'}",
                 f"data.split.val=[{val}]", "data.split.test=[]", "data.patch_size=[64,64]", "trainer.max_epochs=15",
                 "logger.experiment_name=fit_real_nuclei"]
    return overrides, held


def tile_quality(project: Path, reference_python: str | None) -> list[dict]:
    """Per unseen tile of the real image (held out, and validation), as it is: the fit score and
    verdict, and the Dice of the model's foreground against the annotation (does the check flag
    the tiles the model does worst on?)."""
    import bioflow
    from mlflow.tracking import MlflowClient

    image, labels = nuclei(reference_python)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name(f"fit_{REAL}").experiment_id], max_results=1,
                             order_by=["attributes.start_time DESC"])[0]
    model = bioflow.load_model(run.info.run_id, project_dir=str(project))
    th, tw = image.shape[0] // 4, image.shape[1] // 4
    rows = []
    for kind, tiles in (("held_out", HELD_TILES), ("validation", VAL_TILES)):
        for r, c in tiles:
            box = (slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw))
            out = model.predict(image[box].astype(np.float32))
            predicted, truth = np.asarray(out["labels"]).squeeze() > 0, labels[box] > 0
            dice = 2 * float((predicted & truth).sum()) / max(1, int(predicted.sum() + truth.sum()))
            rows.append({"tile": [r, c], "kind": kind, "dice": round(dice, 4), "score": round(out["fit"]["score"], 3),
                         "fits": bool(out["fit"]["fits"]), "reason": out["fit"]["reason"]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS))
    parser.add_argument("--images", type=int, default=20, help="held-out images per experiment")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the bench runs")
    parser.add_argument("--project-dir", default=None)
    parser.add_argument("--reference-python", default=None,
                        help=f"an interpreter with the stardist package, for --experiments {REAL} (the real nuclei image)")
    args = parser.parse_args(argv)
    project = Path(args.project_dir or tempfile.mkdtemp(prefix="bioflow-fit-"))
    EXTRA[:] = SMOKE if args.smoke else []
    shape = [64, 64] if args.smoke else None
    images = 3 if args.smoke else args.images
    result = {e: measure(e, EXPERIMENTS[e], images, shape, project) for e in args.experiments if e != REAL}
    if REAL in args.experiments:
        found = real_nuclei(args.reference_python, project / "real", images)
        if found is None:
            result[REAL] = {"skipped": "no stardist package here or in --reference-python"}
        else:
            result[REAL] = measure(REAL, found[0], images, None, project, held=found[1])
            result[REAL]["held_out_tiles"] = tile_quality(project, args.reference_python)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
