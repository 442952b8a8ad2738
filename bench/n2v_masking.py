"""Cost of Noise2Void masking (bioflow.transforms.n2v.N2VMasking) per training batch.

Times masking of a 2D batch (16 x 1 x 64 x 64) and a 3D batch (4 x 1 x 32 x 64 x 64) with the
default settings (0.2 % blind spots, roi 11) for three variants: ``uniform`` (N2V), ``median``
(N2V2) and ``struct`` (uniform with a structN2V line of 5 pixels along x). For scale, it also times
one training step (forward, MSE loss, backward, SGD update) of a small U-Net (depth 2, 32 base
channels) on the same batch. Everything runs on one CPU thread, and on CUDA when available.
Prints one JSON object with the median time per batch over ``--repeat`` runs, in milliseconds.

Run:   OMP_NUM_THREADS=1 .venv/bin/python bench/n2v_masking.py
Smoke: .venv/bin/python bench/n2v_masking.py --smoke     (tiny sizes, seconds; run by the tests)

``--smoke`` times the same variants and the training step on tiny batches (2 x 1 x 32 x 32 and
1 x 1 x 8 x 32 x 32), two runs each after one warm-up: the figures mean nothing, the JSON has the
same structure plus ``"smoke": true``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch

from bioflow.models.unet import UNet
from bioflow.losses.restoration import masked_mse
from bioflow.transforms.n2v import N2VMasking

BATCHES = {"2d": (16, 1, 64, 64), "3d": (4, 1, 32, 64, 64)}
SMOKE_BATCHES = {"2d": (2, 1, 32, 32), "3d": (1, 1, 8, 32, 32)}
VARIANTS = {
    "uniform": {"replacement": "uniform"},
    "median": {"replacement": "median"},
    "struct": {"replacement": "uniform", "struct_mask": [1, 1, 1, 1, 1], "struct_axis": "x"},
}


def median_ms(run: Callable[[], object], device: torch.device, repeat: int, warmup: int) -> float:
    """Median wall time of ``run`` in milliseconds, waiting for the device after each call."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 4)


def train_step(shape: tuple[int, ...], device: torch.device) -> Callable[[], object]:
    """One N2V training step of a small U-Net on a masked batch of ``shape``."""
    network = UNet(1, 1, spatial_dims=len(shape) - 2, depth=2, base_channels=32).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3)
    image = torch.rand(shape, device=device)
    masked, mask = N2VMasking()(image)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        masked_mse(network(masked), image, mask).backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30, help="timed runs per masking variant")
    parser.add_argument("--step-repeat", type=int, default=3, help="timed runs of the U-Net training step")
    parser.add_argument("--smoke", action="store_true", help="tiny batches, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    batches, warmup = BATCHES, 3
    if args.smoke:
        batches, warmup, args.repeat, args.step_repeat = SMOKE_BATCHES, 1, 2, 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    out: dict[str, object] = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "unit": "ms per batch (median)",
        "results": {},
    }
    if args.smoke:
        out["smoke"] = True
    for device in devices:
        per_device: dict[str, object] = {}
        for name, shape in batches.items():
            image = torch.rand(shape, device=device)
            entry: dict[str, object] = {"shape": "x".join(map(str, shape))}
            for variant, kwargs in VARIANTS.items():
                masking = N2VMasking(**kwargs)
                entry[variant] = median_ms(lambda: masking(image), device, args.repeat, warmup=warmup)
            entry["unet_train_step"] = median_ms(train_step(shape, device), device, args.step_repeat, warmup=1)
            per_device[name] = entry
        out["results"][device.type] = per_device  # type: ignore[index]
    torch.set_num_threads(threads)  # as it was (main may run in-process, e.g. in the tests)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
