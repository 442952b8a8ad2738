"""Lazily read TIFF arrays: only the part that is sliced is read from disk.

A :class:`LazyTiff` presents a TIFF's first series in bioflow's layout (``(C, [Z], Y, X)`` for
images, ``([Z], Y, X)`` for masks) without loading it. Uncompressed, contiguous files are read box
by box with plain file reads (:class:`~bioflow.data.rawfile.RawArrayFile`); compressed or tiled
files are read chunk by chunk through zarr (the ``zarr`` extra) or, if zarr is not installed, read
whole on first access. The file is (re)opened once per process, so the object can be handed to
data-loader workers (fork or spawn) without sharing a file position or copying the data into the
pickle.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from bioflow.data.rawfile import RawArrayFile
from bioflow.errors import DataError

log = logging.getLogger(__name__)


class LazyArray:
    """What bioflow's lazy arrays share: ``shape`` and ``dtype`` attributes, basic slicing (in the
    subclass), and numpy conversion that reads everything."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __getitem__(self, key: Any) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)


class LazyTiff(LazyArray):
    """A view of a TIFF's data in a chosen axis order.

    Parameters
    ----------
    path
        The TIFF file.
    source_shape, dtype
        Shape and dtype of the file's first series.
    take
        For every source axis: the layout position it goes to, or ``None`` for an axis of length 1
        that is dropped.
    add_channel
        Whether the layout starts with a channel axis of length 1 that the file lacks.
    fixed
        Dropped source axes read at an index other than 0 (e.g. the time point of a time-lapse).
    """

    def __init__(
        self,
        path: str | Path,
        source_shape: tuple[int, ...],
        dtype: np.dtype,
        take: list[int | None],
        add_channel: bool,
        fixed: dict[int, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.source_shape = tuple(source_shape)
        self.dtype = np.dtype(dtype)
        self.take = list(take)
        self.add_channel = add_channel
        self.fixed = dict(fixed or {})
        kept = sorted((pos, i) for i, pos in enumerate(take) if pos is not None)
        layout = [self.source_shape[i] for _, i in kept]
        self.shape = tuple(([1] if add_channel else []) + layout)
        self._source: Any = None
        self._pid: int | None = None

    # -- pickling: never carry an open file or a memory map into another process --------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"] = None
        state["_pid"] = None
        return state

    @property
    def backend(self) -> str:
        """``file``, ``zarr`` or ``memory`` (decided when the file is first read)."""
        self._open()
        return self._backend

    def _open(self) -> Any:
        if self._source is not None and self._pid == os.getpid():
            return self._source
        import tifffile

        try:
            with tifffile.TiffFile(str(self.path)) as tif:
                series = tif.series[0]
                offset = series.dataoffset
                stored = np.dtype(tif.byteorder + series.dtype.char)
            if offset is not None:
                self._source, self._backend = RawArrayFile(self.path, offset, self.source_shape, stored), "file"
            else:
                try:
                    import zarr

                    store = tifffile.imread(str(self.path), aszarr=True, series=0)
                    self._source, self._backend = zarr.open(store, mode="r"), "zarr"
                except ImportError:
                    log.warning("%s: compressed TIFF read whole into memory (install zarr to read it in chunks)", self.path)
                    self._source, self._backend = tifffile.imread(str(self.path), series=0), "memory"
        except Exception as exc:
            raise DataError(f"{self.path}: cannot read the image data ({type(exc).__name__}: {exc})") from exc
        if tuple(self._source.shape) != self.source_shape:
            raise DataError(f"{self.path}: the file changed while in use (shape {tuple(self._source.shape)})")
        self._pid = os.getpid()
        return self._source

    def __getitem__(self, key: Any) -> np.ndarray:
        layout_key = basic_key(key, self.ndim)
        source_key: list[Any] = []
        for axis, pos in enumerate(self.take):
            source_key.append(self.fixed.get(axis, 0) if pos is None else layout_key[pos])
        try:
            data = np.asarray(self._open()[tuple(source_key)], dtype=self.dtype)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{self.path}: cannot read the image data ({type(exc).__name__}: {exc})") from exc
        # axes still present, in source order, and their layout positions
        remaining = [pos for pos in self.take if pos is not None and not isinstance(layout_key[pos], (int, np.integer))]
        order = np.argsort(remaining)
        data = np.transpose(data, order) if len(order) > 1 else data
        if self.add_channel:  # the layout's channel axis of length 1
            data = data[None][layout_key[0]] if isinstance(layout_key[0], slice) else data
        return data

    def __repr__(self) -> str:
        return f"LazyTiff({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


def basic_key(key: Any, ndim: int) -> list[Any]:
    """A full-length list of slices and integers for a basic-indexing key."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1:]
    key = tuple(key) + (slice(None),) * (ndim - len(key))
    if len(key) != ndim:
        raise IndexError(f"too many indices: {len(key)} for {ndim} axes")
    for k in key:
        if not isinstance(k, (slice, int, np.integer)):
            raise TypeError(f"lazy arrays support slices and integers only, got {type(k).__name__}")
    return list(key)
