"""Instances from a semantic segmentation: connected components of the foreground."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def relabel_sequential(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Labels renumbered 1..n in order of first appearance, objects below ``min_size`` pixels removed."""
    sizes = np.bincount(labels.ravel())
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    lut = np.zeros(len(sizes), dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


class ConnectedComponents:
    """Each connected region of foreground becomes one instance.

    Parameters
    ----------
    threshold
        A pixel is foreground when the summed probability of the non-background classes exceeds it.
    min_size
        Regions with fewer pixels are dropped (noise).
    connectivity
        1: neighbours share a face; up to the number of spatial axes: also edges/corners.

    Called with class probabilities ``(K, *spatial)`` (class 0 = background), returns int32 labels
    ``(*spatial)``, 0 for background and 1..n for the instances.
    """

    def __init__(self, threshold: float = 0.5, min_size: int = 0, connectivity: int = 1) -> None:
        self.threshold = threshold
        self.min_size = min_size
        self.connectivity = connectivity

    def __call__(self, probabilities: np.ndarray) -> np.ndarray:
        foreground = np.asarray(probabilities[1:]).sum(axis=0) > self.threshold
        structure = ndimage.generate_binary_structure(foreground.ndim, min(self.connectivity, foreground.ndim))
        labels, _ = ndimage.label(foreground, structure=structure)
        return relabel_sequential(labels.astype(np.int64), self.min_size)

    @staticmethod
    def bioflow_example_inputs(spatial_dims: int) -> tuple[np.ndarray]:
        """Probabilities of two classes with two separate square objects (for contract tests)."""
        shape = (32,) * spatial_dims
        fg = np.zeros(shape, np.float32)
        fg[(slice(2, 10),) * spatial_dims] = 0.9
        fg[(slice(20, 30),) * spatial_dims] = 0.8
        return (np.stack([1 - fg, fg]),)
