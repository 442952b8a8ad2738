"""Reading TIFF and OME-TIFF images into bioflow's channel-first layout.

Axes come from the file's metadata when it has trustworthy ones (OME-TIFF, ImageJ hyperstacks),
otherwise from the axes the user declares (``"YX"``, ``"ZYX"``, ``"CYX"``, ``"YXC"``, ``"CZYX"``,
...); a single 2D page needs no declaration. Whatever the order in the file, images come out as
``(C, Y, X)`` or ``(C, Z, Y, X)`` and masks as ``(Y, X)`` or ``(Z, Y, X)``.

Nothing is loaded when a file is opened: images are :class:`~bioflow.data.lazy.LazyTiff` views
that read only the slices asked for (memory map, or zarr chunks for compressed and tiled files).
Pixel sizes (micrometres, in spatial-axis order) are read from OME ``PhysicalSize*`` attributes or
from ImageJ's resolution and spacing.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bioflow.data.lazy import LazyTiff
from bioflow.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")
# Letters bioflow understands: channels (C, and S for samples such as RGB), Z, Y, X, and time (T):
# each time point is an image of its own. Other axes are accepted only with length 1.
_CHANNEL = ("C", "S")
_SPATIAL = ("Z", "Y", "X")
_TIME = "T"


@dataclass
class TiffData:
    """A TIFF image (one time point of a time-lapse) in bioflow's layout."""

    array: Any  # lazy array, channel-first for images, spatial for masks
    file_axes: str
    pixel_size: tuple[float, ...] | None
    frame: int = 0  # the time point
    frames: int = 1  # time points in the file
    channel_names: list[str] | None = None


def file_stem(path: Path) -> str:
    """A TIFF file's name without its extension (``a.ome.tif`` -> ``a``): how files pair and are named."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


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


def layout_plan(axes: str, shape: tuple[int, ...], path: Path, want_channels: bool) -> tuple[list[int | None], bool]:
    """Where each source axis goes in bioflow's layout, and whether a channel axis must be added.

    The layout is (C, [Z], Y, X) for images (``want_channels``) and ([Z], Y, X) for masks. Source
    axes other than C/S, Z, Y and X must have length 1 and are dropped.
    """
    axes = axes.upper()
    if len(axes) != len(shape):
        raise DataError(f"{path}: axes '{axes}' do not fit the data of shape {tuple(shape)} ({len(shape)} axes)")
    if len(set(axes)) != len(axes):
        raise DataError(f"{path}: axes '{axes}' name an axis twice")
    if sum(a in _CHANNEL for a in axes) > 1:
        raise DataError(f"{path}: axes '{axes}' have both C and S (channels); bioflow expects one channel axis")
    if "Y" not in axes or "X" not in axes:
        raise DataError(f"{path}: axes '{axes}' lack Y or X")
    for a, n in zip(axes, shape):
        if a not in _CHANNEL + _SPATIAL + (_TIME,) and n != 1:
            raise DataError(
                f"{path}: axis '{a}' has length {n}; bioflow reads one {a}-point per file "
                "(split the file, or declare the axes if this is a channel or Z axis)"
            )
        if a in _CHANNEL and not want_channels and n != 1:
            raise DataError(f"{path}: a mask must have one channel, this one has {n}")
    spatial = [a for a in _SPATIAL if a in axes]
    has_channel = any(a in _CHANNEL for a in axes)
    offset = 1 if want_channels else 0
    take: list[int | None] = []
    for a in axes:
        if a in _SPATIAL:
            take.append(offset + spatial.index(a))
        elif a in _CHANNEL and want_channels:
            take.append(0)
        else:
            take.append(None)
    return take, want_channels and not has_channel


def _check_complete(path: Path, tif) -> None:
    """Raise if the file is shorter than its image data says (a truncated copy or download)."""
    size = path.stat().st_size
    for page in tif.series[0].pages:
        if page is None:
            continue
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > size:
            raise DataError(f"{path}: the file is truncated ({size} bytes, its image data needs {max(ends)})")


def _channel_names(tif) -> list[str] | None:
    """Channel names from OME metadata (``Channel Name=...``), when every channel has one."""
    if not tif.is_ome:
        return None
    try:
        root = ET.fromstring(tif.ome_metadata)
        pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
        names = [ch.get("Name") for ch in pixels if ch.tag.endswith("Channel")]
    except (ET.ParseError, StopIteration):
        return None
    return names if names and all(names) else None


def read_tiff(path: str | Path, axes: str | None = None, *, channels: bool, axes_option: str = "data.source.axes") -> TiffData:
    """Open one TIFF of a single time point as an image (``channels=True``) or as a mask.

    A time-lapse is an error here (see :func:`read_tiff_frames`).
    """
    frames = read_tiff_frames(path, axes, channels=channels, axes_option=axes_option)
    if len(frames) > 1:
        raise DataError(f"{path}: a time-lapse of {len(frames)} time points where one image is expected")
    return frames[0]


def read_tiff_frames(
    path: str | Path, axes: str | None = None, *, channels: bool, axes_option: str = "data.source.axes"
) -> list[TiffData]:
    """Open one TIFF as images (``channels=True``) or masks, one per time point (T axis).

    Parameters
    ----------
    path
        A ``.tif``/``.tiff`` file (OME-TIFF included).
    axes
        Declared axes of the file's data; used when the file has no OME or ImageJ axes. A 2D
        single page needs none.
    channels
        Return (C, [Z], Y, X) for images, or ([Z], Y, X) for masks.
    axes_option
        How messages name the option that declares axes (``--axes`` for ``bioflow predict``).

    Returns
    -------
    list of TiffData
        One lazy view per time point (a single one without a T axis).
    """
    import tifffile

    path = Path(path)
    try:
        tif = tifffile.TiffFile(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:
        raise DataError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})") from exc
    with tif:
        try:
            series = tif.series[0] if tif.series else None
            found = _metadata_axes(tif)
        except Exception as exc:  # damaged tags or metadata: tifffile fails in many ways
            raise DataError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})") from exc
        if series is None or not all(int(n) > 0 for n in series.shape):
            shape = "" if series is None else f" (shape {tuple(series.shape)})"
            raise DataError(f"{path}: the TIFF file holds no image{shape}")
        file_axes = found or (axes.upper() if axes else None)
        if file_axes is None:
            if len(series.shape) == 2:
                file_axes = "YX"
            else:
                raise DataError(
                    f"{path}: data of shape {tuple(series.shape)} without axes metadata; declare them "
                    f"with {axes_option} (for example ZYX, CYX, YXC or TYX)"
                )
        if found and axes and axes.upper() != found:
            raise DataError(f"{path}: the file's metadata says axes '{found}' but {axes_option} is '{axes}'")
        take, add_channel = layout_plan(file_axes, tuple(series.shape), path, want_channels=channels)
        try:
            _check_complete(path, tif)
            pixel_size = _pixel_size(tif, file_axes)
            names = _channel_names(tif) if channels else None
            dtype = series.dtype
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})") from exc
    time_axis = file_axes.find(_TIME)
    n_frames = int(series.shape[time_axis]) if time_axis >= 0 else 1
    return [
        TiffData(
            array=LazyTiff(path, tuple(series.shape), dtype, take, add_channel,
                           fixed={time_axis: t} if time_axis >= 0 else None),
            file_axes=file_axes, pixel_size=pixel_size, frame=t, frames=n_frames, channel_names=names,
        )
        for t in range(n_frames)
    ]
