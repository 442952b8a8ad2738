"""Boxes of an array stored contiguously in a file, read and written with plain file I/O.

Uncompressed TIFF data is one C-ordered block at a known offset. Reading a box with file reads
(and writing with file writes) instead of through a memory map keeps a process's resident memory
at the size of the boxes it handles: pages of a memory map that were touched stay in its resident
set, so streaming through a large image that way would grow it to the size of the file. Each
process opens the file for itself, so the object can be handed to data-loader workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

# Read one contiguous span when it is at most this many times the box (or below _SMALL bytes);
# otherwise split the box along its first axis.
_SPAN_RATIO = 4
_SMALL = 1 << 20


def _normalise(key: Sequence[Any], shape: Sequence[int]) -> list[Any]:
    out: list[Any] = []
    for k, n in zip(key, shape):
        if isinstance(k, slice):
            out.append(slice(*k.indices(n)))
        else:
            k = int(k)
            out.append(k + n if k < 0 else k)
    return out


class RawArrayFile:
    """An array of ``shape`` and ``dtype`` stored C-ordered in ``path`` from byte ``offset`` on."""

    def __init__(self, path: str | Path, offset: int, shape: Sequence[int], dtype: Any, writable: bool = False) -> None:
        self.path = Path(path)
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.writable = writable
        self.strides = [int(np.prod(self.shape[i + 1:])) * self.dtype.itemsize for i in range(len(self.shape))]
        self._fh: BinaryIO | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fh"] = state["_pid"] = None
        return state

    def _file(self) -> BinaryIO:
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.path, "r+b" if self.writable else "rb", buffering=0)  # noqa: SIM115
            self._pid = os.getpid()
        return self._fh

    def close(self) -> None:
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = None

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = tuple(key) + (slice(None),) * (len(self.shape) - len(key))
        return self._read(_normalise(key, self.shape), self.shape, self.offset)

    def _read(self, key: list[Any], shape: Sequence[int], offset: int) -> np.ndarray:
        if not key:
            return self._pread(offset, 1).reshape(())
        first = key[0]
        if isinstance(first, int):
            return self._read(key[1:], shape[1:], offset + first * self.strides[len(self.shape) - len(shape)])
        axis = len(self.shape) - len(shape)
        indices = range(first.start, first.stop, first.step)
        if len(indices) == 0:
            return np.empty([len(range(*k.indices(n))) for k, n in zip(key, shape) if isinstance(k, slice)], self.dtype)
        box_bytes = self.dtype.itemsize * int(np.prod([len(range(k.start, k.stop, k.step)) if isinstance(k, slice) else 1 for k in key]))
        span = (indices[-1] - indices[0] + 1) * self.strides[axis]
        if first.step == 1 and span <= max(_SPAN_RATIO * box_bytes, _SMALL):
            block = self._pread(offset + first.start * self.strides[axis], span // self.dtype.itemsize)
            block = block.reshape((len(indices),) + tuple(shape[1:]))
            return block[(slice(None),) + tuple(key[1:])]
        return np.stack([self._read(key[1:], shape[1:], offset + i * self.strides[axis]) for i in indices])

    def _pread(self, offset: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=self.dtype)
        view = memoryview(out).cast("B")
        fh = self._file()
        fh.seek(offset)
        done = 0
        while done < len(view):
            n = fh.readinto(view[done:])
            if not n:
                raise OSError(f"{self.path}: unexpected end of file at byte {offset + done}")
            done += n
        return out

    def write(self, start: Sequence[int], data: np.ndarray) -> None:
        """Write ``data`` into the box that begins at index ``start`` (full trailing extents are fastest)."""
        data = np.ascontiguousarray(data, dtype=self.dtype)
        self._write(list(start), data, 0, self.offset)

    def _write(self, start: list[int], data: np.ndarray, axis: int, offset: int) -> None:
        fh = self._file()
        if data.ndim == 0:
            fh.seek(offset)
            fh.write(data.tobytes())
            return
        if all(n == s for n, s in zip(data.shape[1:], self.shape[axis + 1:])):  # one contiguous span
            fh.seek(offset + start[0] * self.strides[axis])
            fh.write(memoryview(data).cast("B"))
            return
        for i in range(data.shape[0]):
            self._write(start[1:], data[i], axis + 1, offset + (start[0] + i) * self.strides[axis])
