"""OME-Zarr (NGFF 0.4 and 0.5) images: read lazily by chunks, and written chunk by chunk.

Reading: the store's metadata is parsed by ome-zarr-py (axes, the datasets of each resolution
level and their scales, label images under ``labels/``); the pixels of the chosen level are read
through zarr, only the chunks a slice touches (:class:`LazyZarr`, a :class:`~bioflow.data.lazy.
LazyTiff` with a zarr array as its source). Images come out in bioflow's layout like TIFFs:
``(C, [Z], Y, X)``, one per time point, with the pixel size in micrometres from the level's scale.

Writing: :class:`ZarrWriter` makes a one-level OME-Zarr store under a hidden ``.partial`` name,
fills it strip by strip or box by box, and renames it into place when complete. The store's
version follows the input's (0.4: zarr v2, 0.5: zarr v3). Label outputs carry NGFF
``image-label`` metadata, so viewers show them as labels.

Both need the ``zarr`` extra (``pip install 'bioflow[zarr]'``: zarr and ome-zarr).
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bioflow.data.lazy import LazyTiff
from bioflow.errors import DataError

ZARR_SUFFIXES = (".ome.zarr", ".zarr")
_UNITS_IN_MICROMETRES = {
    "micrometer": 1.0, "micrometre": 1.0, "micron": 1.0, "µm": 1.0, "um": 1.0,
    "nanometer": 1e-3, "nanometre": 1e-3, "nm": 1e-3, "angstrom": 1e-4,
    "millimeter": 1e3, "millimetre": 1e3, "mm": 1e3, "centimeter": 1e4, "meter": 1e6, "metre": 1e6,
    "picometer": 1e-6,
}


def _require(what: str):
    try:
        import ome_zarr  # noqa: F401
        import zarr  # noqa: F401
    except ImportError:
        raise DataError(f"{what}: reading and writing OME-Zarr needs the zarr extra "
                        "(pip install 'bioflow[zarr]': zarr and ome-zarr)") from None


def is_zarr(path: str | Path) -> bool:
    """Whether ``path`` is a zarr store (v2 or v3 group or array), whatever its name."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zattrs", ".zarray"))


def zarr_stem(path: Path) -> str:
    """A store's name without ``.ome.zarr`` / ``.zarr``: how stores pair and outputs are named."""
    name = path.name.rstrip("/")
    for suffix in ZARR_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@contextmanager
def _quiet():
    """ome-zarr-py logs every version mismatch and orphan label as a warning: not the user's business."""
    logger = logging.getLogger("ome_zarr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass
class Multiscale:
    """The metadata of one NGFF multiscale image (or label image) of a store."""

    path: Path
    axes: list[dict[str, Any]]
    datasets: list[str]  # the path of each resolution level
    transforms: list[list[dict]]  # the coordinate transformations of each level
    version: str
    channel_names: list[str] | None
    label: bool  # a label image
    labels: list[str]  # names of the label images under labels/
    global_scale: list[float] | None = None  # the multiscale's own coordinateTransformations scale

    @property
    def axis_letters(self) -> str:
        letters = ""
        for axis in self.axes:
            name = str(axis.get("name", "")).upper()
            kind = axis.get("type")
            if kind == "channel" or name == "C":
                letters += "C"
            elif kind == "time" or name == "T":
                letters += "T"
            elif name in ("Z", "Y", "X"):
                letters += name
            else:
                letters += "Q"  # another axis: accepted with length 1 only
        return letters

    def level_path(self, level: int) -> Path:
        if not 0 <= level < len(self.datasets):
            raise DataError(f"{self.path}: no resolution level {level}; the store has levels 0..{len(self.datasets) - 1}")
        return self.path / self.datasets[level]

    def scale(self, level: int) -> list[float] | None:
        """The level's scale per axis, times the multiscale's own scale (NGFF allows both)."""
        scale = None
        for transform in self.transforms[level] if level < len(self.transforms) else []:
            if transform.get("type") == "scale" and "scale" in transform:
                scale = [float(s) for s in transform["scale"]]
        if scale is not None and self.global_scale is not None and len(self.global_scale) == len(scale):
            scale = [s * g for s, g in zip(scale, self.global_scale)]
        return scale

    def pixel_size(self, level: int) -> tuple[float, ...] | None:
        """Micrometres per pixel along the spatial axes (Z, Y, X order as in the store), at ``level``."""
        scale = self.scale(level)
        if scale is None or len(scale) != len(self.axes):
            return None
        sizes = []
        for letter, axis, s in zip(self.axis_letters, self.axes, scale):
            if letter in "ZYX":
                unit = str(axis.get("unit") or "micrometer").lower()
                factor = _UNITS_IN_MICROMETRES.get(unit)
                if factor is None or s <= 0:
                    return None
                sizes.append(s * factor)
        return tuple(sizes)


def open_multiscale(path: str | Path, what: str = "image") -> Multiscale:
    """The multiscale image at ``path`` (an NGFF image or label image), via ome-zarr-py."""
    _require(str(path))
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such OME-Zarr store")
    if not is_zarr(path):
        raise DataError(f"{path}: not a zarr store (no zarr.json or .zgroup in it)")
    try:
        with _quiet():
            location = parse_url(str(path), mode="r")
            if location is None:
                raise DataError(f"{path}: not a readable zarr store")
            nodes = list(Reader(location)())
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable OME-Zarr store ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})") from exc
    node = nodes[0] if nodes else None
    spec = None if node is None else next((s for s in node.specs if isinstance(s, Multiscales)), None)
    if spec is None:
        raise DataError(f"{path}: a zarr store without NGFF multiscales metadata; bioflow reads OME-Zarr {what}s "
                        "(NGFF 0.4 or 0.5)")
    meta = node.metadata
    axes = meta.get("axes")
    if not axes:
        raise DataError(f"{path}: the multiscales metadata has no axes")
    axes = [a if isinstance(a, dict) else {"name": str(a)} for a in axes]
    labels: list[str] = []
    labels_dir = path / "labels"
    if labels_dir.is_dir():
        try:
            import zarr

            attrs = dict(zarr.open_group(str(labels_dir), mode="r").attrs)
            labels = [str(n) for n in attrs.get("ome", attrs).get("labels", [])]
        except Exception:
            labels = []
    return Multiscale(
        path=path, axes=axes, datasets=list(spec.datasets),
        transforms=list(meta.get("coordinateTransformations") or []), version=str(location.version),
        channel_names=_channel_names(meta), label=any(isinstance(s, Label) for s in node.specs), labels=labels,
        global_scale=_global_scale(path),
    )


def _global_scale(path: Path) -> list[float] | None:
    """The scale of the multiscale's own coordinateTransformations (applied after each level's)."""
    try:
        import zarr

        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        multiscale = attrs.get("ome", attrs)["multiscales"][0]
        for transform in multiscale.get("coordinateTransformations") or []:
            if transform.get("type") == "scale" and "scale" in transform:
                return [float(v) for v in transform["scale"]]
    except Exception:
        return None
    return None


def _channel_names(meta: dict[str, Any]) -> list[str] | None:
    names = meta.get("channel_names")
    return [str(n) for n in names] if names and all(names) else None


class LazyZarr(LazyTiff):
    """A view of one resolution level of an OME-Zarr store in bioflow's layout, read chunk by chunk."""

    def _open(self) -> Any:
        if self._source is not None and self._pid == os.getpid():
            return self._source
        import zarr

        try:
            self._source = zarr.open_array(str(self.path), mode="r")
        except Exception as exc:
            raise DataError(f"{self.path}: cannot read the image data ({type(exc).__name__}: {exc})") from exc
        self._backend = "zarr"
        if tuple(self._source.shape) != self.source_shape:
            raise DataError(f"{self.path}: the store changed while in use (shape {tuple(self._source.shape)})")
        self._pid = os.getpid()
        return self._source

    def __repr__(self) -> str:
        return f"LazyZarr({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


def read_zarr_frames(path: str | Path, axes: str | None = None, *, channels: bool, level: int = 0,
                     axes_option: str = "data.source.axes", multiscale: Multiscale | None = None) -> list:
    """Open one OME-Zarr image (or label image) as images (``channels=True``) or masks, one per time
    point: like :func:`bioflow.data.tiff.read_tiff_frames`, from the store's NGFF metadata.

    ``level`` chooses the resolution level (0: full resolution); the pixel size is that level's.
    """
    import zarr

    from bioflow.data.tiff import TiffData, layout_plan

    ms = multiscale or open_multiscale(path)
    found = ms.axis_letters
    if axes and axes.upper() != found:
        raise DataError(f"{ms.path}: the store's metadata says axes '{found}' but {axes_option} is '{axes}'")
    array_path = ms.level_path(level)
    try:
        array = zarr.open_array(str(array_path), mode="r")
    except Exception as exc:
        raise DataError(f"{array_path}: cannot open the level-{level} array ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:100]})") from exc
    shape = tuple(int(n) for n in array.shape)
    if not shape or not all(n > 0 for n in shape):
        raise DataError(f"{array_path}: the store holds no image (shape {shape})")
    pixel_size = ms.pixel_size(level)
    if "Z" in found and shape[found.index("Z")] == 1:  # one plane (bioformats2raw writes TCZYX): a 2D image
        if pixel_size is not None:
            pixel_size = pixel_size[1:] if len(pixel_size) == 3 else pixel_size
        found = found.replace("Z", "Q")
    take, add_channel = layout_plan(found, shape, ms.path, want_channels=channels)
    time_axis = found.find("T")
    n_frames = shape[time_axis] if time_axis >= 0 else 1
    names = ms.channel_names if channels else None
    return [
        TiffData(
            array=LazyZarr(array_path, shape, array.dtype, take, add_channel,
                           fixed={time_axis: t} if time_axis >= 0 else None),
            file_axes=found.replace("Q", ""), pixel_size=pixel_size, frame=t, frames=n_frames, channel_names=names,
        )
        for t in range(n_frames)
    ]


def label_image(image: Multiscale, name: str | None) -> Multiscale:
    """The label image ``name`` under the store's ``labels/`` group (None: its only one)."""
    if not image.labels:
        raise DataError(f"{image.path}: the store has no label images (no labels/ group); give the masks another way")
    if name is None:
        if len(image.labels) > 1:
            raise DataError(f"{image.path}: the store has {len(image.labels)} label images ({', '.join(image.labels)}); "
                            "choose one with data.source.labels")
        name = image.labels[0]
    if name not in image.labels:
        from bioflow.errors import did_you_mean

        raise DataError(f"{image.path}: no label image '{name}'{did_you_mean(name, image.labels)} "
                        f"(it has: {', '.join(image.labels)})")
    return open_multiscale(image.path / "labels" / name, "label image")


def matching_level(image: Multiscale, level: int, labels: Multiscale) -> int:
    """The level of ``labels`` whose spatial scale is that of ``image``'s ``level`` (NGFF labels
    may have other levels than their image)."""
    want = image.pixel_size(level)
    for candidate in range(len(labels.datasets)):
        got = labels.pixel_size(candidate)
        if want is None or got is None:
            return level if level < len(labels.datasets) else 0
        if len(got) == len(want) and all(abs(g - w) <= 1e-6 * max(abs(w), 1e-12) for g, w in zip(got, want)):
            return candidate
    raise DataError(f"{labels.path}: no resolution level with the pixel size of the image's level {level} "
                    f"({'x'.join(f'{w:g}' for w in want)} µm)")


# -- writing ----------------------------------------------------------------------------------------
_DEFAULT_CHUNK = {"Z": 32, "Y": 256, "X": 256}


def output_chunks(letters: str, shape: Sequence[int], given: Sequence[int] | None = None) -> tuple[int, ...]:
    """Chunks of an output along its spatial axes (``letters``, e.g. ``"ZYX"``): ``given`` (an
    input store's), else up to 32 in Z and 256 in Y and X."""
    if given is not None:
        return tuple(max(1, min(int(c), int(n))) for c, n in zip(list(given)[-len(shape):], shape))
    return tuple(min(int(n), _DEFAULT_CHUNK.get(a, int(n))) for a, n in zip(letters, shape))


class ZarrWriter:
    """An output written into an OME-Zarr store under a hidden ``.partial`` name, renamed into place
    when complete (the interface of :class:`bioflow.data.writers.TiffWriter`, plus boxes).

    ``spatial_chunks``: chunk sizes along the spatial axes (default :func:`output_chunks`);
    ``version``: NGFF ``"0.4"`` or ``"0.5"``; ``label``: write ``image-label`` metadata;
    ``resume``: reopen a partial store of the same shape instead of starting a new one (``create``
    False: only reopen, never remove or create one);
    ``attributes``: more root attributes (e.g. where the output came from).
    """

    def __init__(self, target: Path, spatial_shape: Sequence[int], spec, file_axes: str,
                 pixel_size: Sequence[float] | None, frames: int = 1, *, spatial_chunks: Sequence[int] | None = None,
                 version: str = "0.5", label: bool = False, resume: bool = False, create: bool = True,
                 attributes: dict[str, Any] | None = None) -> None:
        _require(str(target))
        import zarr

        from bioflow.data.writers import output_axes

        self.target = target
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        self.partial = target.with_name(f".{target.name}.partial")
        axes, self.perm = output_axes(file_axes, spec.channels, frames)
        self.axes = axes
        self.timed = "T" in axes
        self.has_channels = spec.channels is not None
        layout_shape = ((frames,) if self.timed else ()) + ((spec.channels,) if self.has_channels else ())
        layout_shape += self.spatial_shape
        shape = tuple(layout_shape[i] for i in self.perm)
        letters = "".join(a for a in "ZYX" if a in axes)
        by_letter = dict(zip(letters, output_chunks(letters, self.spatial_shape, spatial_chunks)))
        # whole channel axis, one time point per chunk
        self.chunks = tuple(by_letter[a] if a in by_letter else 1 if a == "T" else n for a, n in zip(axes, shape))
        dtype = np.dtype(spec.dtype)
        self.resumed = False
        if resume and self.partial.is_dir():
            try:
                array = zarr.open_array(str(self.partial / "0"), mode="r+")
                if tuple(array.shape) == shape and array.dtype == dtype and tuple(array.chunks) == self.chunks:
                    self.array, self.resumed = array, True
                    if create and attributes:  # the resuming job's provenance (its own prediction run)
                        zarr.open_group(str(self.partial), mode="r+").attrs.update(attributes)
                    return
            except Exception:
                pass
        if not create:  # only the process that creates the stores may remove one
            raise DataError(f"{self.partial}: the partial output cannot be reopened; run the command again")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.array = _create_store(self.partial, shape, self.chunks, dtype, axes, pixel_size, version, label,
                                   target.name, attributes)

    @property
    def spatial_chunks(self) -> tuple[int, ...]:
        return tuple(c for a, c in zip(self.axes, self.chunks) if a in "ZYX")

    def write(self, start: int, block: np.ndarray, frame: int = 0) -> None:
        """Rows ``start..`` of the first spatial axis (``block`` in bioflow's layout: [C], [Z], Y, X)."""
        self.write_box([start] + [0] * (len(self.spatial_shape) - 1), block, frame)

    def write_box(self, corner: Sequence[int], block: np.ndarray, frame: int = 0) -> None:
        """A box with its first spatial pixel at ``corner`` (``block`` in bioflow's layout)."""
        data = block[None] if self.timed else block
        spatial = data.shape[(1 if self.timed else 0) + (1 if self.has_channels else 0):]
        layout = ([slice(frame, frame + 1)] if self.timed else []) + ([slice(None)] if self.has_channels else [])
        layout += [slice(int(c), int(c) + int(n)) for c, n in zip(corner, spatial)]
        self.array[tuple(layout[i] for i in self.perm)] = np.transpose(data, self.perm)

    def close(self) -> None:
        old = None
        if self.target.exists():  # --overwrite: the earlier output goes only once the new one is in place
            old = self.target.with_name(f".{self.target.name}.replaced")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            os.replace(self.target, old)
        os.replace(self.partial, self.target)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    @staticmethod
    def remove_partial(target: Path) -> None:
        """Remove the partial store of ``target`` (if any)."""
        shutil.rmtree(target.with_name(f".{target.name}.partial"), ignore_errors=True)


def _create_store(path: Path, shape, chunks, dtype, axes: str, pixel_size, version: str, label: bool, name: str,
                  attributes: dict[str, Any] | None):
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    fmt = FormatV04() if version == "0.4" else FormatV05()
    root = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    kwargs: dict[str, Any] = {"shape": shape, "chunks": chunks, "dtype": dtype, "fill_value": 0}
    if version == "0.4":
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}  # NGFF 0.4 nests chunks
    array = root.create_array("0", **kwargs)
    spatial = [a for a in axes if a in "ZYX"]
    sizes = dict(zip(spatial, list(pixel_size)[-len(spatial):])) if pixel_size is not None else {}
    scale = [float(sizes.get(a, 1.0)) for a in axes]
    axes_meta = []
    for a in axes:
        entry = {"name": a.lower(), "type": {"C": "channel", "T": "time"}.get(a, "space")}
        if a in "ZYX" and sizes:
            entry["unit"] = "micrometer"
        axes_meta.append(entry)
    with _quiet():
        write_multiscales_metadata(root, [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
                                   fmt=fmt, axes=axes_meta, name=name)
    extra: dict[str, Any] = dict(attributes or {})
    if label:
        extra["image-label"] = {"version": fmt.version}
    if extra:
        if version == "0.4":
            root.attrs.update(extra)
        else:
            ome = dict(root.attrs.get("ome", {}))
            if "image-label" in extra:
                ome["image-label"] = extra.pop("image-label")
            root.attrs.update({"ome": ome, **extra})
    return array
