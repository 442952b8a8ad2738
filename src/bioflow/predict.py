"""``bioflow predict``: apply a trained model to TIFF files of any size.

Images are read lazily, predicted tile by tile (see :mod:`bioflow.inference.tiling`) and the
results are written strip by strip into memory-mapped TIFF files, so memory depends on the tile
and not on the image. Each output is first written under a temporary name and renamed when
complete: an interrupted or failed prediction leaves no half-written file under a final name, and
no input or existing file is ever overwritten (unless ``overwrite`` is given for earlier outputs).

Outputs keep the input's axis order (without the channel axis for label images) and its pixel
size, as OME-TIFF metadata.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bioflow.errors import BioflowError, DataError
from bioflow.inference.outputs import OutputSpec

log = logging.getLogger(__name__)

_PIXEL_SIZE_TOLERANCE = 0.05


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """TIFF files given directly or found in given folders, in a stable order."""
    from bioflow.data.tiff import TIFF_SUFFIXES

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES))
            if not found:
                raise DataError(f"{path}: no .tif/.tiff files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def output_paths(files: Sequence[Path], out_dir: Path, specs: Sequence[OutputSpec], overwrite: bool) -> list[dict[str, Path]]:
    """The output files of every input; refuses to overwrite inputs (always) or other files."""
    from bioflow.data.sources import _stem

    inputs = {f.resolve() for f in files}
    seen: dict[Path, Path] = {}
    plan = []
    for f in files:
        targets = {}
        for i, spec in enumerate(specs):
            name = _stem(f) + ("" if i == 0 else f"_{spec.name}") + ".tif"
            target = (out_dir / name).resolve()
            if target in inputs:
                raise DataError(
                    f"{out_dir}: writing {name} there would overwrite the input {target}; choose another --out folder"
                )
            if target in seen:
                raise DataError(f"{f} and {seen[target]} would both be written to {target}; rename one of them")
            if target.exists() and not overwrite:
                raise DataError(f"{target}: exists already; remove it, choose another --out folder, or pass --overwrite")
            seen[target] = f
            targets[spec.name] = target
        plan.append(targets)
    return plan


def output_axes(file_axes: str, channels: int | None) -> tuple[str, list[int]]:
    """Axes of an output in the input's order, and the permutation from bioflow's layout to them.

    The layout is (C, [Z], Y, X) when the output has channels, ([Z], Y, X) otherwise. Input axes
    other than channels and Z/Y/X are dropped; a channel axis goes where the input had one, or
    first.
    """
    axes = "".join("C" if a in "CS" else a for a in file_axes.upper() if a in "CSZYX")
    if channels is None:
        axes = axes.replace("C", "")
    elif "C" not in axes:
        axes = "C" + axes
    layout = ("C" if channels is not None else "") + "".join(a for a in "ZYX" if a in axes)
    return axes, [layout.index(a) for a in axes]


def _ome_metadata(axes: str, pixel_size: Sequence[float] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"axes": axes}
    if pixel_size is not None:
        spatial = [a for a in "ZYX" if a in axes]
        for a, size in zip(spatial[-len(pixel_size):], pixel_size[-len(spatial):]):
            meta[f"PhysicalSize{a}"] = float(size)
    return meta


class TiffWriter:
    """An output TIFF written strip by strip with plain file writes, renamed into place when done."""

    def __init__(self, target: Path, spatial_shape: Sequence[int], spec: OutputSpec, file_axes: str,
                 pixel_size: Sequence[float] | None) -> None:
        import tifffile

        from bioflow.data.rawfile import RawArrayFile

        self.target = target
        self.partial = target.with_name(f".{target.name}.partial")
        axes, self.perm = output_axes(file_axes, spec.channels)
        layout_shape = ((spec.channels,) if spec.channels is not None else ()) + tuple(spatial_shape)
        shape = tuple(layout_shape[i] for i in self.perm)
        # An empty, uncompressed TIFF of the final size; its data block is then filled in place.
        tifffile.imwrite(str(self.partial), shape=shape, dtype=spec.dtype, ome=True,
                         metadata=_ome_metadata(axes, pixel_size))
        with tifffile.TiffFile(str(self.partial)) as tif:
            offset = tif.series[0].dataoffset
        self.file = RawArrayFile(self.partial, offset, shape, np.dtype(spec.dtype).newbyteorder("<"), writable=True)
        self.has_channels = spec.channels is not None

    def write(self, start: int, block: np.ndarray) -> None:
        """Write rows ``start..`` of the first spatial axis (``block`` in bioflow's layout order)."""
        layout_start = [0, start] if self.has_channels else [start]
        layout_start += [0] * (block.ndim - len(layout_start))
        self.file.write([layout_start[i] for i in self.perm], np.transpose(block, self.perm))

    def close(self) -> None:
        self.file.close()
        os.replace(self.partial, self.target)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def choose_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def predict(
    model: str,
    inputs: Sequence[str],
    out: str,
    *,
    project_dir: str,
    tracking_uri: str | None = None,
    axes: str | None = None,
    tile_size: Sequence[int] | None = None,
    overlap: Sequence[int] | None = None,
    batch_size: int | None = None,
    tta: bool = False,
    blend: str = "cosine",
    rescale: bool = False,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict[str, Path]]:
    """Predict every input TIFF with ``model`` (a checkpoint file, an MLflow run id or a bioimage.io package).

    Returns, for each input, the output files written (by output name).
    """
    import torch

    from bioflow.checkpoint import load_model
    from bioflow.data.tiff import read_tiff
    from bioflow.inference.bioimageio import is_package, load_package
    from bioflow.tracking.store import Store

    files = collect_inputs(inputs)
    if is_package(model):  # run through bioimage.io's runtime (see bioflow.inference.bioimageio)
        task = load_package(model)
    else:
        task = load_model(model, Store.create(project_dir, tracking_uri)).task
    for line in task.prediction_caveats():
        print(f"bioflow: note: {line}", file=sys.stderr)
    device = choose_device(device)
    task.to(device)
    out_dir = Path(out)
    plan = output_paths(files, out_dir, task.prediction_outputs(), overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = dict(tile_size=tile_size, overlap=overlap, batch_size=batch_size, tta=tta, blend=blend, progress=progress)
    results = []
    for f, targets in zip(files, plan):
        image = read_tiff(f, axes, channels=True)
        _check_compatible(task, image, f)
        factor = _resolution_factor(task, image.pixel_size, f, rescale)
        shape = tuple(image.array.shape[1:])
        session = task.prediction_session(shape, out_dir)
        writers: dict[str, TiffWriter] = {}

        def writer(spec: OutputSpec) -> TiffWriter:
            writers[spec.name] = TiffWriter(targets[spec.name], shape, spec, image.file_axes, image.pixel_size)
            return writers[spec.name]

        try:
            for spec in session.outputs:
                if spec.streamed:
                    writer(spec)
            sink = _session_sink(session, writers)
            with torch.no_grad():
                if factor is None:
                    task.predict_array(image.array, sink=sink, **options)
                else:
                    _predict_rescaled(task, image, factor, sink, options)
            finished = session.finish()
            for spec in session.outputs:
                if not spec.streamed:
                    writer(spec).write(0, finished[spec.name])
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        finally:
            session.close()
        results.append(targets)
        print(f"bioflow: {f} -> {', '.join(str(t) for t in targets.values())}", flush=True)
    return results


# Strips are finalised in chunks of about this many pixels, to bound temporary arrays.
_FINALIZE_PIXELS = 1 << 21


def _session_sink(session, writers: dict[str, TiffWriter]):
    def sink(start: int, raw) -> None:
        row_pixels = max(1, int(np.prod(raw.shape[2:])))
        step = max(1, _FINALIZE_PIXELS // row_pixels)
        for offset in range(0, raw.shape[1], step):
            for name, block in session.block(start + offset, raw[:, offset:offset + step]).items():
                writers[name].write(start + offset, block)

    return sink


def _check_compatible(task, image, path: Path) -> None:
    from bioflow.data.records import check_finite

    info = task.data_info
    channels, spatial = image.array.shape[0], image.array.ndim - 1
    if spatial != info.spatial_dims:
        raise DataError(f"{path}: a {spatial}D image, but the model was trained on {info.spatial_dims}D images")
    if channels != info.in_channels:
        raise DataError(
            f"{path}: the image has {channels} channel(s) but the model expects {info.in_channels} "
            "(check the axes: declare them with --axes if the file has no metadata)"
        )
    check_finite(image.array, str(path))


def _resolution_factor(task, pixel_size, path: Path, rescale: bool) -> list[float] | None:
    """Zoom factors that bring the image to the training pixel size, if ``rescale`` is asked."""
    trained = task.data_info.pixel_size
    if trained is None or pixel_size is None:
        return None
    ratio = [p / t for p, t in zip(pixel_size, trained)]
    if all(abs(r - 1) <= _PIXEL_SIZE_TOLERANCE for r in ratio):
        return None
    sizes = "x".join(f"{p:g}" for p in pixel_size)
    trained_sizes = "x".join(f"{t:g}" for t in trained)
    if not rescale:
        log.warning(
            "%s: pixel size %s differs from the training pixel size %s; objects appear at another scale than "
            "the model learnt (pass --rescale to resample the image to the training pixel size)", path, sizes, trained_sizes,
        )
        return None
    return ratio


def _predict_rescaled(task, image, factor, sink, options) -> None:
    """Resample to the training pixel size, predict, resample the raw output back, then ``sink`` it."""
    import torch
    from scipy import ndimage

    data = np.asarray(image.array, dtype=np.float32)
    zoomed = np.stack([ndimage.zoom(c, factor, order=1) for c in data])
    parts: list[torch.Tensor] = []
    task.predict_array(zoomed, sink=lambda start, raw: parts.append(raw.cpu()), **options)
    raw = torch.cat(parts, dim=1).numpy()
    shape = data.shape[1:]
    back = [s / z for s, z in zip(shape, raw.shape[1:])]
    restored = np.stack([ndimage.zoom(c, back, order=1) for c in raw])
    restored = restored[(slice(None),) + tuple(slice(0, s) for s in shape)]
    if restored.shape[1:] != shape:  # zoom rounding: pad the last row/column by repetition
        pad = [(0, 0)] + [(0, s - r) for s, r in zip(shape, restored.shape[1:])]
        restored = np.pad(restored, pad, mode="edge")
    sink(0, torch.from_numpy(np.ascontiguousarray(restored)))


def auto_tile_size(task, device: str, batch_size: int, fraction: float = 0.25) -> list[int]:
    """A tile size whose activations fit in a fraction of the free memory of ``device``.

    The network's memory per pixel is measured once on a small probe tile (sum of every layer's
    output size, an upper bound for inference), then scaled to the memory budget.
    """
    import torch

    dims = task.data_info.spatial_dims
    multiple = task.size_multiple
    probe_edge = max(32 if dims == 2 else 16, multiple * 2)
    probe_edge = int(math.ceil(probe_edge / multiple) * multiple)
    probe = torch.zeros((1, task.data_info.in_channels) + (probe_edge,) * dims, device=device)
    total = [0]

    def count(_m, _i, output) -> None:
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in task.net.modules()]
    try:
        with torch.no_grad():
            task.net(probe)
    finally:
        for h in hooks:
            h.remove()
    per_pixel = max(total[0] / probe_edge**dims, 1.0)
    budget = _free_memory(device) * fraction / max(1, batch_size)
    edge = (budget / per_pixel) ** (1 / dims)
    limit = 2048 if dims == 2 else 256
    edge = int(min(max(edge, 2 * multiple), limit) // multiple * multiple)
    floor = minimum_tile(task)
    return [max(edge, floor)] * dims


def minimum_tile(task) -> int:
    from bioflow.inference.tiling import minimum_overlap, padded_size

    return padded_size(2 * minimum_overlap(task.receptive_field()), task.size_multiple)


def _free_memory(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 4.0 * 2**30
