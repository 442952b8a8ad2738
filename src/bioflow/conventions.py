"""Conventions that several layers share (data, losses, metrics, tasks).

``IGNORE_INDEX`` marks target pixels that count in no loss and no metric: the padding of patches
cut at an image border, and (in label masks) unannotated pixels.

:class:`Blocks` is a finished output (e.g. StarDist's label image) made block by block as it is
written, so that it never has to fit in memory.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

IGNORE_INDEX = -1


class Blocks:
    """A finished output made block by block along the first spatial axis, as it is written.

    ``blocks`` is called once per use and yields ``(start, block)`` pairs that together cover
    ``shape``; ``np.asarray`` assembles them (for outputs kept in memory).
    """

    def __init__(self, shape: Sequence[int], dtype: Any, blocks: Callable[[], Iterable[tuple[int, np.ndarray]]]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._blocks = blocks

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return iter(self._blocks())

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.zeros(self.shape, self.dtype)
        for start, block in self:
            out[start:start + block.shape[0]] = block
        return out if dtype is None else out.astype(dtype)


def output_blocks(value: Any) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, block)`` pairs of a finished output: its :class:`Blocks`, or one block at 0."""
    if isinstance(value, Blocks):
        yield from value
    else:
        yield 0, np.asarray(value)
