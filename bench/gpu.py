"""GPU readiness: training throughput and NMS on a CUDA GPU, against the CPU where that is the point.

Measures, on the first CUDA device:

* ``stardist_train``: StarDist 2D training patches/s (the default recipe, patch 256, batch 16,
  synthetic nuclei) in float32 and with bf16 autocast (``trainer.precision=bf16-mixed``), and the
  mean training loss of the last steps of each, from the same start, as a check that bf16 learns
  as well;
* ``stardist_nms``: greedy polygon NMS of the dense 1024x1024 scene of ``bench/stardist_nms.py``
  (about 900 objects, about 150,000 candidates) on the GPU and on the CPU (one thread), with the
  number of polygons kept by each (they must agree);
* ``stardist3d_train``: StarDist 3D training patches/s (``experiment=demo_stardist3d`` with the
  default U-Net width, 64 rays, patch 32x128x128, batch 4) in float32 and bf16 autocast;
* ``n2v_train``: Noise2Void training patches/s (U-Net depth 2, 32 channels, patch 64, batch 128).

Without a CUDA GPU it says so in its JSON and exits 0. Prints one JSON object. ``bench/gpu.sh``
runs it; ``--quick`` shortens every measurement (for a smoke test on the GPU).

``--smoke`` (seconds; run by the tests, with or without a GPU) runs every part at tiny sizes (tiny
networks and patches, 3 training steps after 1 warm-up, no loader workers, NMS of a 256 x 256
scene): on the CUDA GPU when there is one, else on the CPU in its place (``"device": "cpu"``,
the GPU's NMS reported as skipped). The figures mean nothing; the JSON has the same structure plus
``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/stardist_nms.py's scenes


# Tiny versions of each part's setup, added after its own overrides in a smoke run.
SMOKE = {
    "stardist_train": ["data.patch_size=[32,32]", "data.batch_size=2", "data.num_workers=0", "data.source.n_images=4",
                       "data.source.shape=[64,64]", "model.depth=1", "model.base_channels=4", "task.head_features=8",
                       "task.n_rays=8"],
    "stardist3d_train": ["data.patch_size=[8,32,32]", "data.batch_size=1", "data.num_workers=0",
                         "data.source.n_images=4", "data.source.shape=[16,48,48]", "model.depth=1",
                         "model.base_channels=4", "task.n_rays=16", "task.stem_channels=4", "task.features=4",
                         "task.head_features=8"],
    "n2v_train": ["data.patch_size=[32,32]", "data.batch_size=4", "data.num_workers=0", "data.source.n_images=4",
                  "data.source.shape=[64,64]", "model.depth=1", "model.base_channels=4"],
}
SMOKE_STEPS = (3, 1)  # (steps, warm-up steps)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _train_throughput(overrides: list[str], steps: int, warmup: int, precision: str, device: str = "cuda") -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from bioflow.data.module import BioflowDataModule
    from bioflow.tasks import create_task, get_task, settings_of
    from bioflow.testing import compose_config

    config = compose_config(*overrides, f"data.patches_per_epoch={10**6}", "seed=0")
    L.seed_everything(0, verbose=False)
    cls = get_task(config["task"]["name"])
    settings = settings_of(cls, config["task"])
    data = BioflowDataModule(config["data"], config["sampler"], 0, cls.target_kind, cls.target_transform(settings))
    data.prepare()
    info = {"in_channels": data.in_channels, "spatial_dims": data.spatial_dims, "pixel_size": None,
            "split": data.split, "normalization": data.normalizer.as_dict()}
    task = create_task(config, info)
    marks: dict[str, float] = {}
    losses: list[float] = []

    class Timer(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == warmup:
                _sync(device)
                marks["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, *args):
            if trainer.global_step > steps - 10:
                losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    accelerator = "gpu" if device == "cuda" else "cpu"
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, precision=precision, callbacks=[Timer()])
    trainer.fit(task, train_dataloaders=data.train_dataloader())
    _sync(device)
    seconds = time.perf_counter() - marks["start"]
    batch = int(config["data"]["batch_size"])
    return {"precision": precision, "patches_per_s": round((steps - warmup) * batch / seconds, 1),
            "seconds_per_step": round(seconds / (steps - warmup), 4), "mean_loss_last_steps": float(sum(losses) / len(losses))}


def stardist_train(quick: bool, smoke: bool = False, device: str = "cuda") -> dict:
    overrides = ["experiment=demo_stardist", "data.patch_size=[256,256]", "data.batch_size=16",
                 "data.num_workers=4", "data.source.n_images=16", "data.source.shape=[512,512]"]
    steps, warmup = (30, 10) if quick else (300, 30)
    if smoke:
        overrides, (steps, warmup) = overrides + SMOKE["stardist_train"], SMOKE_STEPS
    runs = [_train_throughput(overrides, steps, warmup, p, device) for p in ("32-true", "bf16-mixed")]
    faster = runs[1]["patches_per_s"] > runs[0]["patches_per_s"]
    close = abs(runs[1]["mean_loss_last_steps"] - runs[0]["mean_loss_last_steps"]) <= 0.05 * abs(runs[0]["mean_loss_last_steps"])
    return {"runs": runs, "bf16_faster": faster, "bf16_loss_within_5_percent": close,
            "recommended_precision": "bf16-mixed" if faster and close else "32-true"}


def stardist3d_train(quick: bool, smoke: bool = False, device: str = "cuda") -> dict:
    overrides = ["experiment=demo_stardist3d", "model.depth=3", "model.base_channels=32", "data.patch_size=[32,128,128]",
                 "data.batch_size=4", "data.num_workers=4", "data.source.n_images=8", "data.source.shape=[48,192,192]"]
    steps, warmup = (20, 5) if quick else (120, 20)
    if smoke:
        overrides, (steps, warmup) = overrides + SMOKE["stardist3d_train"], SMOKE_STEPS
    return {"runs": [_train_throughput(overrides, steps, warmup, p, device) for p in ("32-true", "bf16-mixed")]}


def stardist_nms(quick: bool, smoke: bool = False, device: str = "cuda") -> dict:
    import numpy as np
    import torch

    from stardist_nms import NMS_THRESH, PROB_THRESH, ellipse_scene, noisy_prediction  # bench/stardist_nms.py

    from bioflow.stardist.nms import non_maximum_suppression

    labels = ellipse_scene(50, (8.0, 18.0), 17, (256, 256)) if smoke else ellipse_scene(900, (8.0, 18.0), 17)
    prob, dist = noisy_prediction(labels, 18)
    rows, cols = np.nonzero(prob > PROB_THRESH)
    points = torch.from_numpy(np.stack([rows, cols], axis=1))
    cand_d, cand_p = torch.from_numpy(dist[rows, cols]), torch.from_numpy(prob[rows, cols])
    out = {"candidates": int(rows.size)}
    repeats = 1 if quick or smoke else 3
    threads = torch.get_num_threads()
    for where in ("cuda", "cpu") if device == "cuda" else ("cpu",):
        if where == "cpu":
            torch.set_num_threads(1)
        args = [t.to(where) for t in (points, cand_d, cand_p)]
        times = []
        for _ in range(repeats + 1):
            _sync(where)
            start = time.perf_counter()
            kept = non_maximum_suppression(*args, PROB_THRESH, NMS_THRESH)
            _sync(where)
            times.append(time.perf_counter() - start)
        out[where] = {"seconds": round(min(times[1:]), 4), "kept": int(len(kept))}
    torch.set_num_threads(threads)
    if "cuda" not in out:  # a smoke run without a GPU
        out["cuda"] = {"skipped": "no CUDA GPU"}
        out["same_kept"] = out["speedup"] = None
        return out
    out["same_kept"] = out["cuda"]["kept"] == out["cpu"]["kept"]
    out["speedup"] = round(out["cpu"]["seconds"] / max(out["cuda"]["seconds"], 1e-9), 2)
    return out


def n2v_train(quick: bool, smoke: bool = False, device: str = "cuda") -> dict:
    overrides = ["experiment=demo_n2v", "data.patch_size=[64,64]", "data.batch_size=128", "data.num_workers=4",
                 "model.depth=2", "model.base_channels=32", "data.source.shape=[512,512]"]
    steps, warmup = (30, 10) if quick else (300, 30)
    if smoke:
        overrides, (steps, warmup) = overrides + SMOKE["n2v_train"], SMOKE_STEPS
    return _train_throughput(overrides, steps, warmup, "32-true", device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short measurements (smoke test on the GPU)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, seconds, on the CPU without a GPU: checks that the bench runs")
    args = parser.parse_args(argv)
    import torch

    report: dict = {"benchmark": "gpu", "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if args.smoke:
        report["smoke"] = True
    if not report["cuda"] and not args.smoke:
        report["message"] = "no CUDA GPU on this machine: nothing measured"
        print(json.dumps(report))
        return report
    device = "cuda" if report["cuda"] else "cpu"
    report["device"] = torch.cuda.get_device_name(0) if report["cuda"] else "cpu"
    parts = (("stardist_train", stardist_train), ("stardist3d_train", stardist3d_train), ("stardist_nms", stardist_nms),
             ("n2v_train", n2v_train))
    for name, fn in parts:
        start = time.perf_counter()
        try:
            report[name] = fn(args.quick, args.smoke, device)
        except Exception as exc:  # one failed part must not hide the others
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[name]["bench_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
