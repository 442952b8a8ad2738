"""Per-object tables of a label image: label, confidence, size and centroid of every object.

Gathered while the label image passes block by block on its way to disk (never held whole), so a
table costs one pass of counting over what is written anyway. A table is a numpy structured array
(one row per object that has pixels, by increasing label) with the fields ``label``,
``probability`` (the model's confidence in the object, NaN where the model gives none), ``area``
(2D) or ``volume`` (3D) in pixels, and ``centroid_z`` (3D), ``centroid_y``, ``centroid_x`` in pixels
of the label image. ``bioflow predict`` writes it as CSV beside the label image.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bioflow.conventions import Blocks


def table_dtype(spatial_dims: int) -> np.dtype:
    size = "area" if spatial_dims == 2 else "volume"
    axes = "zyx"[-spatial_dims:]
    return np.dtype([("label", np.int32), ("probability", np.float32), (size, np.int64)]
                    + [(f"centroid_{a}", np.float64) for a in axes])


class ObjectTable:
    """Counts the pixels and coordinates of every label of a label image as its blocks pass.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    probabilities
        Confidence of object ``k`` at index ``k - 1`` (labels are 1, 2, ...), or None.
    """

    def __init__(self, spatial_dims: int, probabilities: Sequence[float] | None = None) -> None:
        self.spatial_dims = spatial_dims
        self.probabilities = None if probabilities is None else np.asarray(probabilities, np.float64)
        self._reset()

    def _reset(self) -> None:
        self.count = np.zeros(1, np.int64)
        self.sums = np.zeros((self.spatial_dims, 1), np.float64)

    def add(self, start: int, block: np.ndarray) -> None:
        """One block of the label image whose first axis begins at ``start``."""
        labels = np.asarray(block).astype(np.int64, copy=False).ravel()
        size = max(int(labels.max(initial=0)) + 1, self.count.size)
        if size > self.count.size:
            self.count = np.pad(self.count, (0, size - self.count.size))
            self.sums = np.pad(self.sums, ((0, 0), (0, size - self.sums.shape[1])))
        self.count += np.bincount(labels, minlength=size)
        for axis, coords in enumerate(np.indices(block.shape, sparse=True)):
            full = np.broadcast_to(coords + (start if axis == 0 else 0), block.shape).ravel()
            self.sums[axis] += np.bincount(labels, weights=full, minlength=size)

    def watch(self, labels: Blocks) -> Blocks:
        """The label image's blocks, counted as they pass (each pass starts the count again)."""
        def blocks():
            self._reset()
            for start, block in labels:
                self.add(start, block)
                yield start, block

        return Blocks(labels.shape, labels.dtype, blocks)

    def rows(self) -> np.ndarray:
        """The table: one row per label with pixels (background excluded)."""
        present = np.flatnonzero(self.count[1:]) + 1
        table = np.zeros(present.size, table_dtype(self.spatial_dims))
        table["label"] = present
        probabilities = np.full(present.size, np.nan)
        if self.probabilities is not None:
            known = present - 1 < self.probabilities.size
            probabilities[known] = self.probabilities[present[known] - 1]
        table["probability"] = probabilities
        table["area" if self.spatial_dims == 2 else "volume"] = self.count[present]
        for axis, name in enumerate(f"centroid_{a}" for a in "zyx"[-self.spatial_dims:]):
            table[name] = self.sums[axis, present] / self.count[present]
        return table


def write_csv(path, tables: Sequence[np.ndarray], frames: bool) -> None:
    """Write per-frame tables as one CSV (a ``frame`` column first when ``frames``)."""
    with open(path, "w", encoding="utf-8") as fh:
        names = list(tables[0].dtype.names) if tables else []
        fh.write(",".join((["frame"] if frames else []) + names) + "\n")
        for t, table in enumerate(tables):
            for row in table:
                values = [f"{row[n]:.6g}" if np.issubdtype(table.dtype[n], np.floating) else str(row[n]) for n in names]
                fh.write(",".join(([str(t)] if frames else []) + values) + "\n")
