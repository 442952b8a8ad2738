"""Output images written piece by piece under a hidden name and renamed into place when complete.

:class:`TiffWriter` writes OME-TIFF files strip by strip with plain file writes;
:class:`bioflow.data.omezarr.ZarrWriter` writes OME-Zarr stores. Both keep the input's axis order
(:func:`output_axes`) and pixel size. An output is described by anything with ``channels`` (None:
no channel axis) and ``dtype`` (e.g. :class:`bioflow.inference.outputs.OutputSpec`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def output_axes(file_axes: str, channels: int | None, frames: int = 1) -> tuple[str, list[int]]:
    """Axes of an output in the input's order, and the permutation from bioflow's layout to them.

    The layout is ([T], [C], [Z], Y, X): T for a time-lapse (``frames`` > 1), C when the output has
    channels. Input axes other than time, channels and Z/Y/X are dropped; a channel axis goes where
    the input had one, or first (after T).
    """
    keep = "TCSZYX" if frames > 1 else "CSZYX"
    axes = "".join("C" if a in "CS" else a for a in file_axes.upper() if a in keep)
    if channels is None:
        axes = axes.replace("C", "")
    elif "C" not in axes:
        axes = axes.replace("T", "TC") if "T" in axes else "C" + axes
    layout = ("T" if "T" in axes else "") + ("C" if channels is not None else "") + "".join(a for a in "ZYX" if a in axes)
    return axes, [layout.index(a) for a in axes]


def _spatial_sizes(axes: str, pixel_size: Sequence[float] | None) -> dict[str, float]:
    if pixel_size is None:
        return {}
    spatial = [a for a in "ZYX" if a in axes]
    return {a: float(size) for a, size in zip(spatial[-len(pixel_size):], pixel_size[-len(spatial):])}


def _ome_metadata(axes: str, pixel_size: Sequence[float] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"axes": axes}
    for a, size in _spatial_sizes(axes, pixel_size).items():
        meta[f"PhysicalSize{a}"] = size
        meta[f"PhysicalSize{a}Unit"] = "µm"
    return meta


def _resolution(axes: str, pixel_size: Sequence[float] | None) -> dict[str, Any]:
    """TIFF resolution tags (pixels per centimetre) for simple readers that ignore OME metadata."""
    sizes = _spatial_sizes(axes, pixel_size)
    if "X" not in sizes or "Y" not in sizes or min(sizes["X"], sizes["Y"]) <= 0:
        return {}
    return {"resolution": (1e4 / sizes["X"], 1e4 / sizes["Y"]), "resolutionunit": "CENTIMETER"}


class TiffWriter:
    """An output TIFF written strip by strip with plain file writes, renamed into place when done."""

    def __init__(self, target: Path, spatial_shape: Sequence[int], spec: Any, file_axes: str,
                 pixel_size: Sequence[float] | None, frames: int = 1) -> None:
        import tifffile

        from bioflow.data.rawfile import RawArrayFile

        self.target = target
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        self.partial = target.with_name(f".{target.name}.partial")
        axes, self.perm = output_axes(file_axes, spec.channels, frames)
        self.timed = "T" in axes
        layout_shape = ((frames,) if self.timed else ()) + ((spec.channels,) if spec.channels is not None else ())
        layout_shape += tuple(spatial_shape)
        shape = tuple(layout_shape[i] for i in self.perm)
        # An empty, uncompressed TIFF of the final size; its data block is then filled in place.
        tifffile.imwrite(str(self.partial), shape=shape, dtype=spec.dtype, ome=True,
                         metadata=_ome_metadata(axes, pixel_size), **_resolution(axes, pixel_size))
        with tifffile.TiffFile(str(self.partial)) as tif:
            offset = tif.series[0].dataoffset
        self.file = RawArrayFile(self.partial, offset, shape, np.dtype(spec.dtype).newbyteorder("<"), writable=True)
        self.has_channels = spec.channels is not None

    def write(self, start: int, block: np.ndarray, frame: int = 0) -> None:
        """Write rows ``start..`` of the first spatial axis of time point ``frame`` (``block`` in
        bioflow's layout order: [C], [Z], Y, X)."""
        layout_start = ([frame] if self.timed else []) + ([0, start] if self.has_channels else [start])
        layout_start += [0] * (block.ndim + self.timed - len(layout_start))
        data = block[None] if self.timed else block
        self.file.write([layout_start[i] for i in self.perm], np.transpose(data, self.perm))

    def close(self) -> None:
        self.file.close()
        os.replace(self.partial, self.target)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)
