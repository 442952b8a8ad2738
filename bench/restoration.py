"""Restoration benchmarks: Noise2Void framework overhead, prediction speed, and N2V/CARE quality.

Prints one JSON object with

* ``n2v_throughput``: training patches/s of Noise2Void in bioflow (Lightning, bioflow's data module,
  masking on the device) against a bare PyTorch loop training the same network, in the same
  channels-last layout, on tensors (inputs and masks) made in advance; U-Net depth 2, 32 base
  channels, patch 64x64, batch 16, 2D, CPU; the ratio of time per step is the framework's overhead
  (``bench/n2v_speed.py`` measures it pinned and side by side, and against CAREamics);
* ``masking_ms_per_batch``: the blind-spot masking of one such batch;
* ``prediction``: tiled prediction of a 1024x1024 image (tile 256);
* ``quality``: on a 1024x1024 synthetic image with Gaussian noise of sigma 25 (0-255 scale), the PSNR
  of the noisy image and of N2V after ``--steps`` training steps on that image (batch 16, patch 64),
  and of CARE trained for the same steps on other synthetic pairs with the same noise; mean and
  standard deviation over ``--seeds`` seeds; for each content in ``--structures`` (nuclei-like
  blobs, blobs with filaments).

Run:   .venv/bin/python bench/restoration.py [--steps 100] [--seeds 0 1 2] [--threads 2]
Smoke: .venv/bin/python bench/restoration.py --smoke     (tiny sizes, seconds; run by the tests)

``--smoke`` runs every part at tiny sizes (U-Net width 8, patch 32, batch 4, 2 timed steps after 1
warm-up, a 128x128 image with tile 64, 2 training steps, one seed, one content): the figures mean
nothing, the JSON has the same structure (the prediction's key names its own size and tile) plus
``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

N2V = ["experiment=demo_n2v"]
CARE = ["experiment=demo_care", "data.source.noise=gaussian", "data.source.sigma=25.0", "data.source.blur=0.0"]
COMMON = ["data.patch_size=[64,64]", "data.batch_size=16", "data.num_workers=0", "model.depth=2",
          "model.base_channels=32", "scheduler=none"]
# The sizes of a full run and of a smoke run: training batch and patch, U-Net width, quality image
# and prediction tile; the smoke sizes are added after COMMON (later overrides win).
FULL = {"batch": 16, "patch": 64, "channels": 32, "image": 1024, "tile": 256, "pairs": 8, "pair_size": 256,
        "throughput_images": 4, "throughput_size": 512, "overrides": []}
SMOKE = {"batch": 4, "patch": 32, "channels": 8, "image": 128, "tile": 64, "pairs": 2, "pair_size": 64,
         "throughput_images": 2, "throughput_size": 64,
         "overrides": ["data.patch_size=[32,32]", "data.batch_size=4", "model.base_channels=8"]}


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    return float(10 * np.log10(data_range**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def build(overrides: list[str], seed: int, steps: int, sizes: dict = FULL):
    """bioflow's data module and task for a config, as `bioflow train` builds them."""
    import lightning as L

    from bioflow.data.module import BioflowDataModule
    from bioflow.tasks import create_task, get_task, settings_of
    from bioflow.testing import compose_config

    config = compose_config(*overrides, *COMMON, *sizes["overrides"], f"seed={seed}",
                            f"data.patches_per_epoch={sizes['batch'] * steps}")
    L.seed_everything(seed, verbose=False)
    cls = get_task(config["task"]["name"])
    settings = settings_of(cls, config["task"])
    data = BioflowDataModule(config["data"], config["sampler"], seed, cls.target_kind, cls.target_transform(settings))
    data.prepare()
    task = create_task(config, {"in_channels": data.in_channels, "spatial_dims": data.spatial_dims, "pixel_size": None,
                        "split": data.split})
    return data, task


def fit(data, task, steps: int, timer=None) -> None:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[timer] if timer else [])
    trainer.fit(task, train_dataloaders=data.train_dataloader())


class StepTimer:
    """Wall time of training steps after a warm-up (Lightning callback)."""

    def __init__(self, warmup: int) -> None:
        from lightning.pytorch.callbacks import Callback

        outer = self

        class _Timer(Callback):
            def on_train_batch_start(self, trainer, *args):
                if trainer.global_step == warmup:
                    outer.start = time.perf_counter()

            def on_train_batch_end(self, trainer, *args):
                outer.end = time.perf_counter()

        self.callback = _Timer()
        self.start = self.end = 0.0


def throughput(steps: int, warmup: int, sizes: dict = FULL) -> dict:
    from bioflow.models.unet import UNet
    from bioflow.losses.restoration import masked_mse
    from bioflow.transforms.n2v import N2VMasking

    batch, patch, side = sizes["batch"], sizes["patch"], sizes["throughput_size"]
    data_cfg = [f"data.source.n_images={sizes['throughput_images']}", f"data.source.shape=[{side},{side}]",
                "data.split.val=0.0", "data.split.test=0.0"]
    data, task = build(N2V + data_cfg, 0, steps + warmup, sizes)
    timer = StepTimer(warmup)
    fit(data, task, steps + warmup, timer.callback)
    framework = (timer.end - timer.start) / steps

    torch.manual_seed(0)
    net = UNet(1, 1, depth=2, base_channels=sizes["channels"], norm="none").to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=4e-4)
    masking = N2VMasking()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps + warmup):  # inputs and masks made in advance
        image = torch.rand(batch, 1, patch, patch, generator=g)
        masked, mask = masking(image, generator=g)
        batches.append((image, masked, mask))
    for i, (image, masked, mask) in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        loss = masked_mse(net(masked.contiguous(memory_format=torch.channels_last)), image, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bare = (time.perf_counter() - start) / steps
    images = torch.rand(batch, 1, patch, patch)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        masking(images, generator=g)
        times.append(time.perf_counter() - t)
    return {
        "framework_patches_per_s": round(batch / framework, 2), "bare_patches_per_s": round(batch / bare, 2),
        "framework_s_per_step": round(framework, 4), "bare_s_per_step": round(bare, 4),
        "overhead_ratio": round(framework / bare, 3), "steps_timed": steps,
        "masking_ms_per_batch": round(1000 * statistics.median(times), 3),
    }


def predict_restored(task, noisy: np.ndarray, tile: int = 256) -> np.ndarray:
    parts = []
    with torch.no_grad():
        task.predict_array(noisy[None], sink=lambda start, raw: parts.append(raw.cpu()), tile_size=[tile])
    return torch.cat(parts, dim=1)[0].numpy()


def quality(steps: int, seeds: list[int], structures: str, sizes: dict = FULL) -> dict:
    from bioflow.data.synthetic_restoration import synthetic_restoration_pair

    size, tile, pair = sizes["image"], sizes["tile"], sizes["pair_size"]
    noisy, clean = synthetic_restoration_pair((size, size), seed=1000, index=0, noise="gaussian", sigma=25.0,
                                              structures=structures)
    content = [f"data.source.structures={structures}"]
    image_cfg = content + ["data.source.n_images=1", f"data.source.shape=[{size},{size}]", "data.source.seed=1000",
                           "data.split.val=0.0", "data.split.test=0.0"]
    pairs_cfg = content + [f"data.source.n_images={sizes['pairs']}", f"data.source.shape=[{pair},{pair}]",
                           "data.source.seed=1", "data.split.val=0.0", "data.split.test=0.0"]
    results: dict[str, list[float]] = {"n2v": [], "care": []}
    prediction_s = []
    for seed in seeds:
        data, task = build(N2V + image_cfg, seed, steps, sizes)
        fit(data, task, steps)
        task.eval()
        t = time.perf_counter()
        results["n2v"].append(psnr(predict_restored(task, noisy, tile), clean))
        prediction_s.append(time.perf_counter() - t)
        data, task = build(CARE + pairs_cfg, seed, steps, sizes)
        fit(data, task, steps)
        task.eval()
        results["care"].append(psnr(predict_restored(task, noisy, tile), clean))
    noisy_psnr = psnr(noisy, clean)
    out = {"image": f"{size}x{size} {structures}, gaussian sigma 25 of 255", "steps": steps, "batch": sizes["batch"],
           "patch": sizes["patch"],
           "seeds": seeds, "noisy_psnr": round(noisy_psnr, 2)}
    for name, values in results.items():
        out[name] = {"psnr": [round(v, 2) for v in values], "mean": round(statistics.mean(values), 2),
                     "sd": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                     "gain_db_mean": round(statistics.mean(values) - noisy_psnr, 2)}
    out[f"prediction_{size}_tile{tile}_s"] = round(statistics.median(prediction_s), 2)
    out["prediction_megapixels_per_s"] = round(size * size / statistics.median(prediction_s) / 1e6, 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "quality"])
    parser.add_argument("--structures", nargs="+", default=["blobs", "mixed"], choices=["blobs", "mixed", "filaments"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    timed, warmup = (2, 1) if args.smoke else (30, 5)
    if args.smoke:
        args.steps, args.seeds, args.structures = 2, args.seeds[:1], args.structures[:1]
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"benchmark": "restoration", "threads": torch.get_num_threads(), "device": "cpu"}
    if args.smoke:
        report["smoke"] = True
    if "throughput" not in args.skip:
        report["n2v_throughput"] = throughput(steps=timed, warmup=warmup, sizes=sizes)
    if "quality" not in args.skip:
        report["quality"] = [quality(args.steps, args.seeds, structures, sizes) for structures in args.structures]
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
