"""Applying a predictor to one image: its input read lazily, the checks before, the strips after.

What ``bioflow predict`` (file by file or block by block), ``bioflow.predict_array`` and the Python
API share: :func:`open_input` opens an input's time points with the model's channels,
:func:`check_compatible` and :func:`resolution_factor` check it against the model, and
:func:`session_sink` hands the tiler's strips of raw output to the task's prediction session and
its blocks to the writers (with ``--tta-spread``, the spread to its own writer).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from bioflow.data.records import check_finite
from bioflow.errors import DataError
from bioflow.inference.options import PredictionOptions
from bioflow.inference.outputs import OutputSpec

log = logging.getLogger(__name__)

_PIXEL_SIZE_TOLERANCE = 0.05


def open_input(task, f: Path, opts: PredictionOptions):
    """The input's time points as lazy channel-first arrays (the model's channels), and the first's metadata."""
    from bioflow.data.images import read_frames
    from bioflow.data.views import SubArray, channel_indices

    frames = read_frames(f, opts.axes, channels=True, axes_option="--axes", level=opts.level)
    wanted = getattr(task, "channel_selection", None)  # models from other tools choose none
    arrays = []
    for frame in frames:
        array = frame.array
        if wanted:
            array = SubArray(array, channels=channel_indices(wanted, array.shape[0], frame.channel_names, str(f)))
        arrays.append(array)
    return arrays, frames[0]


class ArrayWriter:
    """Collects one output of one image in memory (the in-memory twin of :class:`TiffWriter`)."""

    def __init__(self, spatial_shape: Sequence[int], spec: OutputSpec) -> None:
        shape = ((spec.channels,) if spec.channels is not None else ()) + tuple(spatial_shape)
        self.array = np.zeros(shape, dtype=spec.dtype)
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        self.has_channels = spec.channels is not None

    def write(self, start: int, block: np.ndarray, frame: int = 0) -> None:
        rows = slice(start, start + block.shape[1 if self.has_channels else 0])
        self.array[(slice(None), rows) if self.has_channels else rows] = block


#: ``--tta-spread``: how much the predictions of the flipped and turned image disagree, per pixel.
SPREAD = OutputSpec("tta_spread", None, np.float32)


def outputs_of(task, tta_spread: bool = False) -> list[OutputSpec]:
    """The outputs a prediction writes per input: the task's, and the TTA spread on request."""
    return [*task.prediction_outputs(), *([SPREAD] if tta_spread else [])]


def spread_stride(task) -> tuple[int, ...]:
    stride = task.output_stride() if hasattr(task, "output_stride") else getattr(task, "stride", None)
    return tuple(int(g) for g in stride) if stride else ()


def write_spread(writer, start: int, block, stride: Sequence[int], frame: int) -> None:
    """A strip of the spread, brought from the output grid (``stride``; empty: the image's own) to
    the image's pixels."""
    import torch

    spatial = writer.spatial_shape
    if any(int(g) > 1 for g in stride):  # on a coarser grid: each value covers its cell
        for axis, g in enumerate(stride):
            block = torch.repeat_interleave(block, int(g), dim=axis)
        start *= int(stride[0])
    rows = max(0, min(block.shape[0], spatial[0] - start))
    crop = (slice(0, rows),) + tuple(slice(0, s) for s in spatial[1:])
    writer.write(start, block[crop].float().cpu().numpy(), frame=frame)


# Strips are finalised in chunks of about this many pixels, to bound temporary arrays.
FINALIZE_PIXELS = 1 << 21


def session_sink(session, writers: dict, frame: int = 0, spread_stride: Sequence[int] | None = None):
    """The sink that hands strips of raw output to the session and writes its blocks; with
    ``spread_stride``, the last channel is the TTA spread (on the output grid of that stride),
    written as it is to the ``tta_spread`` output at the image's size."""
    def sink(start: int, raw) -> None:
        if spread_stride is not None:
            write_spread(writers[SPREAD.name], start, raw[-1], spread_stride, frame)
            raw = raw[:-1]
        row_pixels = max(1, int(np.prod(raw.shape[2:])))
        step = max(1, FINALIZE_PIXELS // row_pixels)
        for offset in range(0, raw.shape[1], step):
            for name, block in session.block(start + offset, raw[:, offset:offset + step]).items():
                writers[name].write(start + offset, block, frame=frame)

    return sink


def check_compatible(task, array, path: Path) -> None:
    check_shape(task, array, path)
    check_finite(array, str(path), when="prediction")


def check_shape(task, array, path: Path) -> None:
    info = task.data_info
    channels, spatial = array.shape[0], array.ndim - 1
    if spatial != info.spatial_dims:
        raise DataError(f"{path}: a {spatial}D image, but the model was trained on {info.spatial_dims}D images")
    if channels != info.in_channels:
        raise DataError(
            f"{path}: the image has {channels} channel(s) but the model expects {info.in_channels} "
            "(check the axes: declare them with --axes if the file has no metadata)"
        )


def resolution_factor(task, pixel_size, path: Path, rescale: bool, warn: bool = True) -> list[float] | None:
    """Zoom factors that bring the image to the training pixel size, if ``rescale`` is asked."""
    trained = task.data_info.pixel_size
    if trained is None or pixel_size is None:
        return None
    ratio = [p / t for p, t in zip(pixel_size, trained)]
    if all(abs(r - 1) <= _PIXEL_SIZE_TOLERANCE for r in ratio):
        return None
    sizes = "x".join(f"{p:g}" for p in pixel_size) + " µm"
    trained_sizes = "x".join(f"{t:g}" for t in trained) + " µm"
    if not rescale:
        if not warn:
            return None
        log.warning(
            "%s: pixel size %s differs from the training pixel size %s; objects appear at another scale than "
            "the model learnt (pass --rescale to resample the image to the training pixel size)", path, sizes, trained_sizes,
        )
        return None
    return ratio


def predict_rescaled(task, array, factor, sink, options) -> None:
    """Resample to the training pixel size, predict, resample the raw output back, then ``sink`` it."""
    import torch
    from scipy import ndimage

    data = np.asarray(array, dtype=np.float32)
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


def input_pixels(f: Path, opts: PredictionOptions) -> int:
    """Pixels of an input (all time points), from its metadata; 1 where unknown."""
    from bioflow.data.images import read_frames

    try:
        frames = read_frames(f, opts.axes, channels=True, level=opts.level)
        return int(np.prod(frames[0].array.shape[1:])) * len(frames)
    except Exception:
        return 1
