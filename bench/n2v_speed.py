"""Noise2Void speed, side by side: bioflow against its own bare loop and against CAREamics.

Each measurement runs in its own process, pinned to one core, with one thread (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``). A round runs three pairs, the two sides of each pair at the same time,
one per core (the cores swap every round, so neither side keeps the faster core):

* ``train``: bioflow's N2V training (``experiment=n2v_own_data`` on TIFFs written by the bench,
  Lightning, bioflow's data module and masking) against CAREamics' N2V (``create_advanced_n2v_config``
  on the same images as arrays); patches/s of the timed steps after a warm-up;
* ``bare``: bioflow's training against a bare PyTorch loop training the same network, in the same
  (channels-last) layout and with bioflow's process settings (``bioflow.allocator``), on tensors
  and masks made in advance (the framework's overhead);
* ``predict``: tiled prediction of one image, the same tile, overlap and batch on both sides (bioflow
  with its cosine blending); pixels/s, the median of ``--repeats`` calls after one warm-up call.

Both sides train the same network, CAREamics' N2V default: U-Net depth 2, 32 channels at the top,
batch norm (``--no-batch-norm`` for none on every side), weight-free bilinear up-sampling with the
block below handing up half its channels (bioflow's ``model.upsampling=linear``); patch 64, batch 16,
0.2% blind spots in an 11x11 neighbourhood, flips and quarter turns, Adam. The parameter counts in the
JSON differ only by the convolution biases CAREamics keeps before its batch norms. The JSON gives each figure per round and the
medians of the per-round ratios with their range.

Run:   .venv/bin/python bench/n2v_speed.py --reference-python ~/.cache/careamics-ref/bin/python
Smoke: .venv/bin/python bench/n2v_speed.py --smoke     (tiny sizes, seconds; run by the tests)

The reference environment (its own venv; CAREamics is never a dependency of bioflow)::

    python3.11 -m venv ~/.cache/careamics-ref
    ~/.cache/careamics-ref/bin/pip install torch==2.13.0
    ~/.cache/careamics-ref/bin/pip install --no-deps careamics==0.3.5
    ~/.cache/careamics-ref/bin/pip install "bioimageio-core<=0.11.0" "pydantic<2.14" "lightning<=2.6.6" \\
        matplotlib microssim "numpy<=2.4.6" psutil pyyaml scikit-image "tifffile<=2026.3.3" \\
        "torchmetrics<1.9" "zarr>=3,<4" typer

torchvision is left out (its Linux wheels need CUDA's torch): CAREamics imports it only for its LVAE
models, so the reference worker gives it an empty stand-in module before importing CAREamics.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = {"batch": 16, "patch": 64, "channels": 32, "depth": 2, "images": 4, "size": 512, "steps": 60, "warmup": 10,
        "predict_size": 1024, "tile": 256, "overlap": 48, "predict_batch": 4, "repeats": 3}
SMOKE = {"batch": 2, "patch": 32, "channels": 8, "depth": 2, "images": 2, "size": 64, "steps": 2, "warmup": 1,
         "predict_size": 128, "tile": 64, "overlap": 16, "predict_batch": 2, "repeats": 1}


# ---- workers (one process each; the reference worker runs under the reference interpreter) ----

def _pin(core: int | None) -> None:
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


def _step_timer(warmup: int, out: dict):
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == warmup:
                out["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, *args):
            out["end"] = time.perf_counter()
            out["steps"] = trainer.global_step - warmup

    return StepTimer()


def _images(folder: Path) -> list:
    import tifffile

    return [tifffile.imread(p) for p in sorted(folder.glob("*.tif"))]


def worker_bioflow(args, sizes: dict) -> dict:
    import lightning as L
    import numpy as np
    import torch

    from bioflow.allocator import keep_freed_memory
    from bioflow.data.module import BioflowDataModule
    from bioflow.prediction import predict_array
    from bioflow.inference.options import PredictionOptions
    from bioflow.tasks import create_task, get_task, settings_of
    from bioflow.testing import compose_config

    torch.set_num_threads(1)
    keep_freed_memory()  # as `bioflow train` does
    steps = sizes["steps"] + sizes["warmup"] if args.part != "predict" else 2
    config = compose_config(
        "experiment=n2v_own_data", f"data.source.images={args.data}", "data.split.val=0.0", "data.split.test=0.0",
        f"data.patch_size=[{sizes['patch']},{sizes['patch']}]", f"data.batch_size={sizes['batch']}",
        "data.num_workers=0", f"data.patches_per_epoch={sizes['batch'] * steps}", f"model.depth={sizes['depth']}",
        f"model.base_channels={sizes['channels']}", f"model.norm={'batch' if args.batch_norm else 'none'}",
        "model.upsampling=linear",
        "scheduler=none", "seed=0")
    L.seed_everything(0, verbose=False)
    cls = get_task(config["task"]["name"])
    data = BioflowDataModule(config["data"], config["sampler"], 0, cls.target_kind,
                             cls.target_transform(settings_of(cls, config["task"])))
    data.prepare()
    task = create_task(config, {"in_channels": data.in_channels, "spatial_dims": data.spatial_dims,
                                "pixel_size": None, "split": data.split})
    timing: dict = {}
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False,
                        callbacks=[_step_timer(sizes["warmup"], timing)] if args.part != "predict" else [])
    trainer.fit(task, train_dataloaders=data.train_dataloader())
    if args.part != "predict":
        return {"patches_per_s": sizes["batch"] * timing["steps"] / (timing["end"] - timing["start"]),
                "steps_timed": timing["steps"], "parameters": sum(p.numel() for p in task.parameters())}
    task.eval()
    image = np.load(args.predict_image).astype(np.float32)
    options = PredictionOptions(tile_size=(sizes["tile"],), overlap=(sizes["overlap"],),
                                batch_size=sizes["predict_batch"], progress=False, device="cpu")
    times = []
    for i in range(sizes["repeats"] + 1):
        start = time.perf_counter()
        predict_array(task, image[None], options)
        if i:
            times.append(time.perf_counter() - start)
    return {"pixels_per_s": image.size / statistics.median(times), "seconds": times}


def worker_bare(args, sizes: dict) -> dict:
    import torch

    from bioflow.allocator import keep_freed_memory
    from bioflow.losses.restoration import masked_mse
    from bioflow.models.unet import UNet
    from bioflow.transforms.n2v import N2VMasking

    torch.set_num_threads(1)
    keep_freed_memory()  # bioflow's process settings, so that the ratio is the framework's alone
    torch.manual_seed(0)
    batch, patch = sizes["batch"], sizes["patch"]
    net = UNet(1, 1, depth=sizes["depth"], base_channels=sizes["channels"],
               norm="batch" if args.batch_norm else "none", upsampling="linear")
    layout = torch.channels_last  # the layout bioflow trains 2D networks in
    net = net.to(memory_format=layout)
    optimizer = torch.optim.Adam(net.parameters(), lr=4e-4)
    masking = N2VMasking()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(sizes["steps"] + sizes["warmup"]):  # inputs and masks made in advance
        image = torch.rand(batch, 1, patch, patch, generator=g)
        masked, mask = masking(image, generator=g)
        batches.append((image, masked, mask))
    for i, (image, masked, mask) in enumerate(batches):
        if i == sizes["warmup"]:
            start = time.perf_counter()
        loss = masked_mse(net(masked.contiguous(memory_format=layout)), image, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"patches_per_s": batch * sizes["steps"] / (time.perf_counter() - start), "steps_timed": sizes["steps"],
            "parameters": sum(p.numel() for p in net.parameters())}


def worker_careamics(args, sizes: dict) -> dict:
    import types

    import numpy as np
    importlib.import_module("torchmetrics.image")  # before the stand-in, so that it sees no torchvision

    stand_in = {name: types.ModuleType(name) for name in
                ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")}
    stand_in["torchvision"].__version__ = "none"
    stand_in["torchvision"].transforms = stand_in["torchvision.transforms"]
    stand_in["torchvision.transforms"].functional = stand_in["torchvision.transforms.functional"]
    for name, module in stand_in.items():
        sys.modules.setdefault(name, module)
    import torch
    from careamics import CAREamist
    from careamics.config import create_advanced_n2v_config

    torch.set_num_threads(1)
    steps = sizes["steps"] + sizes["warmup"] if args.part != "predict" else 2
    images = np.stack(_images(Path(args.data))).astype(np.float32)
    config = create_advanced_n2v_config(
        experiment_name="bench", data_type="array", axes="SYX", patch_size=[sizes["patch"]] * 2,
        batch_size=sizes["batch"], num_epochs=1, num_steps=steps, n_val_patches=sizes["batch"],
        num_workers=0, model_params={"depth": sizes["depth"], "num_channels_init": sizes["channels"],
                                     "use_batch_norm": args.batch_norm},
        optimizer_params={"lr": 4e-4}, trainer_params={"max_steps": steps, "limit_val_batches": 0},
        train_dataloader_params={"num_workers": 0, "shuffle": True}, seed=1)
    timing: dict = {}
    with tempfile.TemporaryDirectory() as work:
        careamist = CAREamist(config, work_dir=work, enable_progress_bar=False,
                              callbacks=[_step_timer(sizes["warmup"], timing)] if args.part != "predict" else None)
        careamist.train(train_data=images)
        if args.part != "predict":
            return {"patches_per_s": sizes["batch"] * timing["steps"] / (timing["end"] - timing["start"]),
                    "steps_timed": timing["steps"],
                    "parameters": sum(p.numel() for p in careamist.model.parameters())}
        image = np.load(args.predict_image).astype(np.float32)
        times = []
        for i in range(sizes["repeats"] + 1):
            start = time.perf_counter()
            careamist.predict(image, axes="YX", data_type="array", tile_size=(sizes["tile"],) * 2,
                              tile_overlap=(sizes["overlap"],) * 2, batch_size=sizes["predict_batch"])
            if i:
                times.append(time.perf_counter() - start)
    return {"pixels_per_s": image.size / statistics.median(times), "seconds": times}


# ---- the driver ----

def make_data(folder: Path, sizes: dict) -> Path:
    """Noisy synthetic images as TIFFs (training) and one larger noisy image as .npy (prediction)."""
    import numpy as np
    import tifffile

    from bioflow.data.synthetic_restoration import synthetic_restoration_pair

    images = folder / "images"
    images.mkdir()
    for i in range(sizes["images"]):
        noisy, _ = synthetic_restoration_pair((sizes["size"],) * 2, seed=1, index=i, noise="gaussian", sigma=25.0)
        tifffile.imwrite(images / f"noisy_{i}.tif", noisy.astype(np.float32))
    noisy, _ = synthetic_restoration_pair((sizes["predict_size"],) * 2, seed=1000, index=0, noise="gaussian",
                                          sigma=25.0)
    np.save(folder / "predict.npy", noisy.astype(np.float32))
    return images


def launch(python: str, kind: str, part: str, core: int | None, folder: Path, args) -> subprocess.Popen:
    command = [python, __file__, "--worker", kind, "--part", part, "--data", str(folder / "images"),
               "--predict-image", str(folder / "predict.npy")]
    if core is not None:
        command += ["--core", str(core)]
    if args.smoke:
        command.append("--smoke")
    if not args.batch_norm:
        command.append("--no-batch-norm")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def collect(process: subprocess.Popen, label: str) -> dict:
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"n2v_speed: the {label} worker failed (exit {process.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def pair(args, folder: Path, part: str, left: tuple[str, str], right: tuple[str, str], cores) -> tuple[dict, dict]:
    """Both sides at once, one core each (or one after the other where there is one core)."""
    if cores is None:
        a = collect(launch(left[1], left[0], part, None, folder, args), left[0])
        b = collect(launch(right[1], right[0], part, None, folder, args), right[0])
        return a, b
    first = launch(left[1], left[0], part, cores[0], folder, args)
    second = launch(right[1], right[0], part, cores[1], folder, args)
    return collect(first, left[0]), collect(second, right[0])


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "rounds": [round(v, 3) for v in values]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-python", help="interpreter with careamics==0.3.5 (the reference)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, help=f"timed training steps per side (default {FULL['steps']})")
    parser.add_argument("--parts", nargs="+", default=["train", "bare", "predict"], choices=["train", "bare", "predict"])
    parser.add_argument("--no-batch-norm", dest="batch_norm", action="store_false",
                        help="the network without batch norm (bioflow's N2V default) on every side")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks that the bench runs")
    parser.add_argument("--worker", choices=["bioflow", "bare", "careamics"], help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--predict-image", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = dict(SMOKE if args.smoke else FULL)
    if args.steps:
        sizes["steps"] = args.steps
    if args.worker:
        _pin(args.core)
        worker = {"bioflow": worker_bioflow, "bare": worker_bare, "careamics": worker_careamics}[args.worker]
        result = worker(args, sizes)
        print(json.dumps(result))
        return result

    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = available[:2] if len(available) >= 2 else None
    rounds = 1 if args.smoke else args.rounds
    here = sys.executable
    results: dict = {"sizes": sizes, "batch_norm": args.batch_norm, "cores": cores, "rounds": rounds,
                     "threads_per_side": 1, "smoke": args.smoke}
    per_round: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_data(folder, sizes)
        for r in range(rounds):
            order = cores if (cores is None or r % 2 == 0) else cores[::-1]
            if "bare" in args.parts:
                a, b = pair(args, folder, "train", ("bioflow", here), ("bare", here), order)
                per_round.setdefault("bare", []).append({"bioflow": a, "bare": b})
            if args.reference_python and "train" in args.parts:
                a, b = pair(args, folder, "train", ("bioflow", here), ("careamics", args.reference_python), order)
                per_round.setdefault("train", []).append({"bioflow": a, "careamics": b})
            if args.reference_python and "predict" in args.parts:
                a, b = pair(args, folder, "predict", ("bioflow", here), ("careamics", args.reference_python), order)
                per_round.setdefault("predict", []).append({"bioflow": a, "careamics": b})
            elif "predict" in args.parts:
                a = collect(launch(here, "bioflow", "predict", order[0] if order else None, folder, args), "bioflow")
                per_round.setdefault("predict", []).append({"bioflow": a})
    def sides(rows: list[dict], key: str, left: str, right: str, ratio: str, over: bool = True) -> dict:
        """Each side's summary of ``key`` over the rounds, and the per-round ratio (left over right,
        or right over left: a time ratio from speeds)."""
        return {f"{left}_{key}": summary([r[left][key] for r in rows]),
                **({f"{right}_{key}": summary([r[right][key] for r in rows])} if right in rows[0] else {}),
                **({ratio: summary([(r[left][key] / r[right][key]) if over else (r[right][key] / r[left][key])
                                    for r in rows])} if right in rows[0] else {})}

    if "bare" in per_round:
        rows = per_round["bare"]
        results["bioflow_vs_bare"] = {
            **sides(rows, "patches_per_s", "bioflow", "bare", "time_ratio_bioflow_over_bare", over=False),
            "parameters": {"bioflow": rows[0]["bioflow"]["parameters"], "bare": rows[0]["bare"]["parameters"]}}
    if "train" in args.parts and not args.reference_python:
        results["training_vs_careamics"] = {"skipped": "no --reference-python (an interpreter with careamics)"}
    if "train" in per_round:
        rows = per_round["train"]
        results["training_vs_careamics"] = {
            **sides(rows, "patches_per_s", "bioflow", "careamics", "speed_ratio_bioflow_over_careamics"),
            "parameters": {"bioflow": rows[0]["bioflow"]["parameters"], "careamics": rows[0]["careamics"]["parameters"]}}
    if "predict" in per_round:
        rows = per_round["predict"]
        results["prediction"] = {"image": f"{sizes['predict_size']}x{sizes['predict_size']}", "tile": sizes["tile"],
                                 "overlap": sizes["overlap"], "batch": sizes["predict_batch"],
                                 **sides(rows, "pixels_per_s", "bioflow", "careamics", "speed_ratio_bioflow_over_careamics")}
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
