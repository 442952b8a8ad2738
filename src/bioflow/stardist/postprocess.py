"""StarDist's post-processor: candidates above a probability threshold, polygon NMS, rendering."""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

from bioflow.stardist.nms import instances_from_prediction


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

    @staticmethod
    def example_input(spatial_dims: int) -> np.ndarray:
        """Exact targets of two discs (probability and 16 distances), for contract checks (2D only)."""
        from bioflow.stardist.targets import object_probabilities, star_distances

        yy, xx = np.mgrid[:40, :40]
        labels = ((yy - 12) ** 2 + (xx - 12) ** 2 < 49).astype(np.int64)
        labels[(yy - 28) ** 2 + (xx - 27) ** 2 < 64] = 2
        dists = star_distances(labels, 16)
        return np.concatenate([object_probabilities(labels)[None], np.moveaxis(dists, -1, 0)]).astype(np.float32)
