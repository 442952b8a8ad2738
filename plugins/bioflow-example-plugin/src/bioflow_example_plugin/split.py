"""Instances from a foreground probability: split touching objects at the peaks of the distance map.

Touching nuclei merge into one connected region of foreground; the distance to the background has
one peak per roughly convex nucleus. Each foreground pixel goes to the nearest peak of its own
region (a Voronoi split of the region), which separates touching convex objects along the line
between them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


class DistanceSplit:
    """Split connected foreground into instances seeded at the peaks of its distance transform.

    Parameters
    ----------
    threshold
        Foreground is where the summed probability of the non-background classes exceeds it.
    min_distance
        Peaks closer than this (pixels) merge into one seed.
    min_size
        Instances with fewer pixels are dropped.

    Called with class probabilities ``(K, *spatial)``; returns int32 labels, 0 for background.
    """

    def __init__(self, threshold: float = 0.5, min_distance: int = 4, min_size: int = 10) -> None:
        self.threshold = threshold
        self.min_distance = min_distance
        self.min_size = min_size

    def __call__(self, probabilities: np.ndarray) -> np.ndarray:
        foreground = np.asarray(probabilities[1:]).sum(axis=0) > self.threshold
        if not foreground.any():
            return np.zeros(foreground.shape, np.int32)
        regions, n_regions = ndimage.label(foreground)
        distance = ndimage.gaussian_filter(ndimage.distance_transform_edt(foreground), 1.0)
        window = 2 * self.min_distance + 1
        peaks = (distance == ndimage.maximum_filter(distance, size=window)) & foreground
        seeds, n_seeds = ndimage.label(peaks)
        nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
        labels = seeds[tuple(nearest)]
        same_region = regions[tuple(nearest)] == regions
        # a region whose pixels found no seed of their own region becomes one instance
        labels = np.where(same_region, labels, n_seeds + regions)
        labels[~foreground] = 0
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(self.min_size, 1)
        keep[0] = False
        lut = np.zeros(len(sizes), np.int32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        return lut[labels]

    @staticmethod
    def bioflow_example_inputs(spatial_dims: int) -> tuple[np.ndarray]:
        """Two touching balls of foreground (the network output the contract check gives it)."""
        grid = np.moveaxis(np.indices((40,) * spatial_dims).astype(np.float32), 0, -1)
        centre_a = np.full(spatial_dims, 20.0)
        centre_b = centre_a.copy()
        centre_a[-1], centre_b[-1] = 12.0, 27.0
        fg = (np.linalg.norm(grid - centre_a, axis=-1) < 8) | (np.linalg.norm(grid - centre_b, axis=-1) < 8)
        fg = fg.astype(np.float32) * 0.9
        return (np.stack([1 - fg, fg]),)
