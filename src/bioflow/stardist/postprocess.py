"""StarDist's post-processors: candidates above a probability threshold, NMS of polygons (2D) or
polyhedra (3D), rendering to labels."""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from bioflow.conventions import Blocks
from bioflow.stardist.nms import instances_from_prediction, non_maximum_suppression
from bioflow.stardist.nms3d import instances_from_prediction_3d, non_maximum_suppression_3d
from bioflow.stardist.polygons import polygons_to_labels
from bioflow.stardist.polyhedra import polyhedra_to_labels
from bioflow.stardist.rays3d import golden_spiral_rays

# Label images from candidates are rendered in strips (planes) of about this many pixels (voxels),
# so that a label volume larger than memory can be written strip by strip.
RENDER_BLOCK_PIXELS = 1 << 20


def _rendered_blocks(shape: Sequence[int], render: Callable[[tuple[int, int]], torch.Tensor]) -> Blocks:
    step = max(1, RENDER_BLOCK_PIXELS // max(1, math.prod(shape[1:])))

    def blocks():
        for start in range(0, shape[0], step):
            yield start, render((start, min(shape[0], start + step))).cpu().numpy()

    return Blocks(shape, np.int32, blocks)


class StarDistNMS:
    """Label image from a StarDist prediction ``(1 + R, H', W')`` (probability, then distances).

    Parameters
    ----------
    prob_thresh
        Candidates are the pixels whose object probability exceeds it.
    nms_thresh
        A candidate is suppressed when its overlap with a kept polygon exceeds it.
    criterion
        ``min_area`` (intersection over the smaller area, the reference criterion) or ``iou``.
    grid
        Subsampling of the prediction; the labels have ``shape`` (default ``H' * gy, W' * gx``).
    shape
        Full-resolution shape of the label image.
    """

    bioflow_spatial_dims = (2,)

    def __init__(self, prob_thresh: float = 0.5, nms_thresh: float = 0.4, criterion: Literal["min_area", "iou"] = "min_area",
                 grid: Sequence[int] = (1, 1), shape: Sequence[int] | None = None) -> None:
        self.prob_thresh = prob_thresh
        self.nms_thresh = nms_thresh
        self.criterion = criterion
        self.grid = tuple(int(g) for g in grid)
        self.shape = None if shape is None else tuple(int(s) for s in shape)

    def __call__(self, output: np.ndarray | torch.Tensor) -> np.ndarray:
        output = torch.as_tensor(np.asarray(output) if not isinstance(output, torch.Tensor) else output)
        prob, dists = output[0], output[1:].clamp(min=0).permute(1, 2, 0)
        labels, _ = instances_from_prediction(
            prob, dists, self.prob_thresh, self.nms_thresh, self.grid, self.shape, self.criterion,
        )
        return labels.cpu().numpy()

    def from_candidates(self, points: torch.Tensor, dists: torch.Tensor, probs: torch.Tensor) -> np.ndarray:
        """The label image from sparse candidates (full-resolution centres ``(K, 2)``, distances
        ``(K, R)``, probabilities ``(K,)``), e.g. those of every tile of a large image at once."""
        return np.asarray(self.blocks_from_candidates(points, dists, probs))

    def kept_candidates(self, points: torch.Tensor, dists: torch.Tensor, probs: torch.Tensor):
        """The candidates non-maximum suppression keeps (points, distances, probabilities)."""
        kept = non_maximum_suppression(points, dists, probs, self.prob_thresh, self.nms_thresh, self.criterion)
        return points[kept], dists[kept], probs[kept]

    def blocks_from_candidates(self, points: torch.Tensor, dists: torch.Tensor, probs: torch.Tensor,
                               kept: bool = False) -> Blocks:
        """As :meth:`from_candidates`, the label image rendered strip by strip as it is read
        (``kept``: the candidates are those :meth:`kept_candidates` returned)."""
        if self.shape is None:
            raise ValueError("from_candidates needs the label image's shape")
        if not kept:
            points, dists, probs = self.kept_candidates(points, dists, probs)
        return _rendered_blocks(self.shape, lambda rows: polygons_to_labels(points, dists, probs, self.shape, rows))

    @staticmethod
    def bioflow_example_inputs(spatial_dims: int) -> tuple[np.ndarray]:
        """Exact targets of two discs (probability and 16 distances), for contract checks (2D only)."""
        from bioflow.stardist.targets import object_probabilities, star_distances

        yy, xx = np.mgrid[:40, :40]
        labels = ((yy - 12) ** 2 + (xx - 12) ** 2 < 49).astype(np.int64)
        labels[(yy - 28) ** 2 + (xx - 27) ** 2 < 64] = 2
        dists = star_distances(labels, 16)
        return (np.concatenate([object_probabilities(labels)[None], np.moveaxis(dists, -1, 0)]).astype(np.float32),)


class StarDistNMS3D:
    """Label volume from a StarDist 3D prediction ``(1 + R, Z', Y', X')`` (probability, then distances).

    Parameters
    ----------
    prob_thresh, nms_thresh, criterion
        As for :class:`StarDistNMS` (overlaps of polyhedra, by volume).
    n_rays
        Number of rays (golden-spiral directions, as the model was trained with).
    anisotropy
        ``(a_z, a_y, a_x)`` the rays were made for (None: isotropic).
    grid
        Subsampling ``(gz, gy, gx)`` of the prediction.
    shape
        Full-resolution shape of the label volume (default ``Z' gz, Y' gy, X' gx``).
    """

    bioflow_spatial_dims = (3,)

    def __init__(self, prob_thresh: float = 0.5, nms_thresh: float = 0.4, criterion: Literal["min_area", "iou"] = "min_area",
                 n_rays: int = 32, anisotropy: Sequence[float] | None = None, grid: Sequence[int] = (1, 1, 1),
                 shape: Sequence[int] | None = None) -> None:
        self.prob_thresh = prob_thresh
        self.nms_thresh = nms_thresh
        self.criterion = criterion
        self.rays = golden_spiral_rays(int(n_rays), anisotropy=None if anisotropy is None else list(anisotropy))
        self.grid = tuple(int(g) for g in grid)
        self.shape = None if shape is None else tuple(int(s) for s in shape)

    def __call__(self, output: np.ndarray | torch.Tensor) -> np.ndarray:
        output = torch.as_tensor(np.asarray(output) if not isinstance(output, torch.Tensor) else output)
        if output.ndim != 4 or output.shape[0] != len(self.rays) + 1:
            raise ValueError(f"expected a prediction (1 + {len(self.rays)}, Z, Y, X), got {tuple(output.shape)}")
        prob, dists = output[0], output[1:].clamp(min=0).permute(1, 2, 3, 0)
        labels, _ = instances_from_prediction_3d(
            prob, dists, self.rays, self.prob_thresh, self.nms_thresh, self.grid, self.shape, self.criterion,
        )
        return labels.cpu().numpy()

    def from_candidates(self, points: torch.Tensor, dists: torch.Tensor, probs: torch.Tensor) -> np.ndarray:
        """The label volume from sparse candidates (full-resolution centres ``(K, 3)``, distances
        ``(K, R)``, probabilities ``(K,)``), e.g. those of every tile of a large stack at once."""
        return np.asarray(self.blocks_from_candidates(points, dists, probs))

    def kept_candidates(self, points: torch.Tensor, dists: torch.Tensor, probs: torch.Tensor):
        """The candidates non-maximum suppression keeps (points, distances, probabilities)."""
        kept = non_maximum_suppression_3d(points, dists, probs, self.rays, self.prob_thresh, self.nms_thresh,
                                          self.criterion)
        return points[kept], dists[kept], probs[kept]

    def blocks_from_candidates(self, points: torch.Tensor, dists: torch.Tensor, probs: torch.Tensor,
                               kept: bool = False) -> Blocks:
        """As :meth:`from_candidates`, the label volume rendered slab by slab as it is read."""
        if self.shape is None:
            raise ValueError("from_candidates needs the label volume's shape")
        if not kept:
            points, dists, probs = self.kept_candidates(points, dists, probs)
        return _rendered_blocks(self.shape,
                                lambda planes: polyhedra_to_labels(points, dists, probs, self.shape, self.rays, planes))

    @staticmethod
    def bioflow_example_inputs(spatial_dims: int) -> tuple[np.ndarray]:
        """Exact targets of two balls (probability and 32 distances), for contract checks."""
        from bioflow.stardist.targets3d import object_probabilities_3d, star_distances_3d

        zz, yy, xx = np.mgrid[:24, :32, :32]
        labels = ((zz - 8) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 < 36).astype(np.int64)
        labels[(zz - 15) ** 2 + (yy - 21) ** 2 + (xx - 22) ** 2 < 49] = 2
        dists = star_distances_3d(labels, golden_spiral_rays(32))
        return (np.concatenate([object_probabilities_3d(labels)[None], np.moveaxis(dists, -1, 0)]).astype(np.float32),)
