"""Image inputs of any format bioflow reads: TIFF files and OME-Zarr stores, one interface.

A TIFF is a file; an OME-Zarr store is a folder (``.ome.zarr`` by convention, recognised by its
zarr metadata whatever its name). Both open as lazy per-time-point views in bioflow's layout
(:class:`bioflow.data.tiff.TiffData`).
"""

from __future__ import annotations

from pathlib import Path

from bioflow.data.omezarr import is_zarr, read_zarr_frames, zarr_stem
from bioflow.data.tiff import TIFF_SUFFIXES, file_stem, read_tiff_frames
from bioflow.errors import DataError


def is_image_input(path: Path) -> bool:
    """A TIFF file or an OME-Zarr store."""
    return (path.is_file() and path.name.lower().endswith(TIFF_SUFFIXES)) or is_zarr(path)


def image_stem(path: Path) -> str:
    """The name outputs are named after (``a.ome.tif`` and ``a.ome.zarr`` -> ``a``)."""
    return zarr_stem(path) if is_zarr(path) else file_stem(path)


def find_images(folder: Path) -> list[Path]:
    """The TIFF files and OME-Zarr stores in a folder, in a stable order (hidden ones, such as a
    prediction's unfinished ``.partial`` outputs, left out)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and is_image_input(p))


def read_frames(path: str | Path, axes: str | None = None, *, channels: bool, axes_option: str = "data.source.axes",
                level: int = 0) -> list:
    """Open a TIFF file or an OME-Zarr store (at resolution ``level``), one view per time point."""
    path = Path(path)
    if is_zarr(path):
        return read_zarr_frames(path, axes, channels=channels, level=level, axes_option=axes_option)
    if level:
        raise DataError(f"{path}: a TIFF file has one resolution level; --level {level} is for OME-Zarr stores")
    return read_tiff_frames(path, axes, channels=channels, axes_option=axes_option)
