"""Facility scale: peak memory of OME-Zarr volume prediction against the volume's size, and a folder
predicted by one process against two (torchrun, gloo).

Memory: a CARE network (3D U-Net, depth 2, 8 base channels, random weights: memory and speed do
not depend on training) predicts float32 OME-Zarr volumes of growing size into OME-Zarr, block by
block; each prediction runs in a fresh process, whose peak resident memory (ru_maxrss of the child)
and wall time are reported. Peak memory should follow the block, not the volume.

Processes: the same 2D network predicts a folder of images with one process, then with two under
torchrun, one thread each; the outputs are compared byte for byte.

The default volumes are one block (64 x 256 x 256, the default 3D block), 4 and 8 blocks; the tile is
chosen automatically (from free memory, up to the block's view) as a user's would be, or fixed with
--tile-size; with a fixed tile, peak memory should not grow with the volume.

Run: .venv/bin/python bench/scale.py [--volumes 64x256x256 64x512x512 128x512x512] [--smoke]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.lower().split("x"))


def write_volume(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...]) -> None:
    """A float32 OME-Zarr volume written chunk row by chunk row (never whole in memory)."""
    import numpy as np
    import zarr
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    array = root.create_array("0", shape=shape, chunks=chunks, dtype=np.float32)
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], chunks[0]):
        depth = min(chunks[0], shape[0] - z)
        array[z:z + depth] = rng.gamma(2.0, 200.0, (depth, *shape[1:])).astype(np.float32)
    write_multiscales_metadata(root, [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [2.0, 0.5, 0.5]}]}], fmt=FormatV05(),
        axes=[{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"])


def run_measured(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``command``; its wall time and the peak resident memory of the process (MiB)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", nargs="+", default=["64x256x256", "64x512x512", "128x512x512"])
    parser.add_argument("--images", type=int, default=32, help="images in the folder for the process comparison")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--tile-size", type=int, nargs="+", default=None,
                        help="the tile of the volume predictions (default: automatic, from free memory)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: checks that the bench runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.volumes, args.images, args.image_size = ["8x64x64", "16x96x96"], 2, 64

    import numpy as np
    import tifffile
    import zarr

    from bioflow.testing import make_checkpoint

    bioflow = str(Path(sys.executable).with_name("bioflow"))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result: dict = {"machine": platform.machine(), "cpus": os.cpu_count(), "tile_size": args.tile_size or "auto",
                    "memory": [], "processes": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model3d = make_checkpoint(tmp / "care3d.ckpt", "experiment=demo_care", "model.depth=2",
                                  "model.base_channels=8", spatial_dims=3, pixel_size=[2.0, 0.5, 0.5])
        for text in args.volumes:
            shape = _shape(text)
            volume = tmp / f"v{text}.ome.zarr"
            write_volume(volume, shape, tuple(min(n, c) for n, c in zip(shape, (32, 128, 128))))
            tile = ["--tile-size", *map(str, args.tile_size)] if args.tile_size else []
            measured = run_measured([bioflow, "predict", str(model3d), str(volume), "--out", str(tmp / f"o{text}"),
                                     "--no-progress", "--no-record", "--device", "cpu", *tile], env)
            voxels = int(np.prod(shape))
            result["memory"].append({"shape": list(shape), "voxels": voxels, "input_mib": round(voxels * 4 / 2**20, 1),
                                     **measured, "voxels_per_second": round(voxels / measured["seconds"])})
        model2d = make_checkpoint(tmp / "care2d.ckpt", "experiment=demo_care", "model.depth=2", "model.base_channels=8")
        folder = tmp / "images"
        folder.mkdir()
        rng = np.random.default_rng(1)
        for i in range(args.images):
            tifffile.imwrite(folder / f"img{i:03d}.tif",
                             rng.gamma(2.0, 200.0, (args.image_size, args.image_size)).astype(np.uint16))
        outputs = {}
        for processes in (1, 2):
            out = tmp / f"p{processes}"
            predict = [bioflow, "predict", str(model2d), str(folder), "--out", str(out), "--no-progress", "--no-record",
                       "--device", "cpu"]
            command = predict if processes == 1 else [torchrun, "--standalone", "--nproc_per_node=2", *predict]
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
            seconds = time.perf_counter() - start
            pixels = args.images * args.image_size ** 2
            result["processes"].append({"processes": processes, "threads_each": 1, "seconds": round(seconds, 2),
                                        "pixels_per_second": round(pixels / seconds)})
            outputs[processes] = {p.name: tifffile.imread(p) for p in sorted(out.glob("*.tif"))}
        result["identical_outputs"] = all(np.array_equal(outputs[1][k], outputs[2].get(k)) for k in outputs[1]) \
            and sorted(outputs[1]) == sorted(outputs[2])
        volume_out = tmp / f"o{args.volumes[-1]}" / f"v{args.volumes[-1]}.ome.zarr"
        result["volume_output_chunks"] = list(zarr.open_array(str(volume_out / "0")).chunks)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
