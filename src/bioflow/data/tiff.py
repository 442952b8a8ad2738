"""Reading TIFF and OME-TIFF images into bioflow's channel-first layout.

Axes come from the file's metadata when it has trustworthy ones (OME-TIFF, ImageJ hyperstacks),
otherwise from the axes the user declares (``"YX"``, ``"ZYX"``, ``"CYX"``, ``"YXC"``, ``"CZYX"``,
...); a single 2D page needs no declaration. Whatever the order in the file, images come out as
``(C, Y, X)`` or ``(C, Z, Y, X)`` and masks as ``(Y, X)`` or ``(Z, Y, X)``.

Uncompressed, contiguous files are memory-mapped, so a patch read touches only its own bytes.
Pixel sizes (micrometres, in spatial-axis order) are read from OME ``PhysicalSize*`` attributes or
from ImageJ's resolution and spacing.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bioflow.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")
# Letters bioflow understands: channels (C, and S for samples such as RGB), Z, Y, X; time (T) and
# other axes are accepted only with length 1.
_CHANNEL = ("C", "S")
_SPATIAL = ("Z", "Y", "X")


@dataclass
class TiffData:
    """A TIFF image in bioflow's layout."""

    array: Any  # numpy array or memory map, channel-first for images, spatial for masks
    file_axes: str
    pixel_size: tuple[float, ...] | None


def _metadata_axes(tif) -> str | None:
    """Axes recorded by OME or ImageJ metadata (others are tifffile's guesses and not trusted)."""
    if tif.is_ome or tif.is_imagej:
        return tif.series[0].axes.upper()
    return None


def _pixel_size(tif, axes: str) -> tuple[float, ...] | None:
    spatial = [a for a in axes if a in _SPATIAL]
    try:
        if tif.is_ome:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            sizes = {a: pixels.get(f"PhysicalSize{a}") for a in spatial}
            if all(sizes[a] is not None for a in spatial):
                return tuple(float(sizes[a]) for a in spatial)
        elif tif.is_imagej:
            meta = tif.imagej_metadata or {}
            page = tif.pages[0]
            if meta.get("unit", "") in ("micron", "um", "µm", "\\u00B5m") and "XResolution" in page.tags:
                xr = page.tags["XResolution"].value
                yr = page.tags["YResolution"].value
                size = {"X": xr[1] / xr[0], "Y": yr[1] / yr[0], "Z": float(meta.get("spacing", 1.0))}
                return tuple(size[a] for a in spatial)
    except (ET.ParseError, StopIteration, ZeroDivisionError, KeyError, TypeError, ValueError):
        return None
    return None


def _open_array(path: Path, tif) -> Any:
    """A memory map when the file allows it (uncompressed, contiguous), else the array in memory."""
    import tifffile

    series = tif.series[0]
    try:
        if series.dataoffset is not None:
            return tifffile.memmap(str(path), series=0, mode="r")
        return series.asarray()
    except Exception as exc:  # corrupt or truncated data
        raise DataError(f"{path}: cannot read the image data ({type(exc).__name__}: {exc})") from exc


def to_layout(array: Any, axes: str, path: Path, want_channels: bool) -> Any:
    """Reorder ``array`` with ``axes`` into (C, [Z], Y, X) (``want_channels``) or ([Z], Y, X)."""
    axes = axes.upper()
    if len(axes) != array.ndim:
        raise DataError(
            f"{path}: axes '{axes}' do not fit the data of shape {tuple(array.shape)} ({array.ndim} axes)"
        )
    if len(set(axes)) != len(axes):
        raise DataError(f"{path}: axes '{axes}' name an axis twice")
    channel_axes = [i for i, a in enumerate(axes) if a in _CHANNEL]
    if len(channel_axes) > 1:
        raise DataError(f"{path}: axes '{axes}' have both C and S (channels); bioflow expects one channel axis")
    keep = [i for i, a in enumerate(axes) if a in _CHANNEL + _SPATIAL]
    for i, a in enumerate(axes):
        if i not in keep and array.shape[i] != 1:
            raise DataError(
                f"{path}: axis '{a}' has length {array.shape[i]}; bioflow reads one {a}-point per file "
                "(split the file, or declare the axes if this is a channel or Z axis)"
            )
    squeeze = tuple(i for i in range(array.ndim) if i not in keep)
    if squeeze:
        array = array.reshape([s for i, s in enumerate(array.shape) if i not in squeeze])
        axes = "".join(a for i, a in enumerate(axes) if i not in squeeze)
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: axes '{axes}' lack Y or X")
    spatial = [axes.index(a) for a in _SPATIAL if a in axes]
    channel = [axes.index(a) for a in axes if a in _CHANNEL]
    if want_channels:
        return np.transpose(array, channel + spatial) if channel else np.transpose(array, spatial)[None]
    if channel:
        if array.shape[channel[0]] != 1:
            raise DataError(f"{path}: a mask must have one channel, this one has {array.shape[channel[0]]}")
        array = np.take(array, 0, axis=channel[0])
        spatial = [i - (i > channel[0]) for i in spatial]
    return np.transpose(array, spatial)


def read_tiff(path: str | Path, axes: str | None = None, *, channels: bool) -> TiffData:
    """Open one TIFF as an image (``channels=True``) or as a mask.

    Parameters
    ----------
    path
        A ``.tif``/``.tiff`` file (OME-TIFF included).
    axes
        Declared axes of the file's data; used when the file has no OME or ImageJ axes. A 2D
        single page needs none.
    channels
        Return (C, [Z], Y, X) for images, or ([Z], Y, X) for masks.
    """
    import tifffile

    path = Path(path)
    try:
        tif = tifffile.TiffFile(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:
        raise DataError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc})") from exc
    with tif:
        if not tif.series:
            raise DataError(f"{path}: the TIFF file holds no image")
        series = tif.series[0]
        found = _metadata_axes(tif)
        file_axes = found or (axes.upper() if axes else None)
        if file_axes is None:
            if len(series.shape) == 2:
                file_axes = "YX"
            else:
                raise DataError(
                    f"{path}: data of shape {tuple(series.shape)} without axes metadata; declare them "
                    "with data.source.axes (for example ZYX, CYX or YXC)"
                )
        if found and axes and axes.upper() != found:
            raise DataError(f"{path}: the file's metadata says axes '{found}' but data.source.axes is '{axes}'")
        data = _open_array(path, tif)
        pixel_size = _pixel_size(tif, file_axes)
    array = to_layout(data, file_axes, path, want_channels=channels)
    return TiffData(array=array, file_axes=file_axes, pixel_size=pixel_size)
