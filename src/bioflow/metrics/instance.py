"""A torchmetrics metric for instance segmentation: object matching scores at IoU thresholds."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchmetrics import Metric

from bioflow.metrics.matching import DEFAULT_THRESHOLDS, MatchStats, check_thresholds, match_instances

_SCORES = ("precision", "recall", "accuracy", "f1", "mean_matched_score", "mean_true_score", "panoptic_quality")


class InstanceMatchingMetric(Metric):
    """Object matching scores (see :mod:`bioflow.metrics.matching`) accumulated over images.

    The states are the per-threshold counts and IoU sums, reduced by summation, so the metric is
    exact when synchronised across distributed processes: the ratios are computed from the
    pooled totals, exactly as :func:`~bioflow.metrics.matching.match_dataset` does.

    Parameters
    ----------
    thresholds : sequence of float
        IoU thresholds ``tau``; a pair matches when ``IoU >= tau``.
    spatial_dims : {2, 3}
        Dimensionality of one label image: with 2, a 3-axis input is a batch of 2D images; with 3,
        it is one (Z, Y, X) volume, matched as a whole (objects are 3D, never cut into slices).
    **kwargs
        Passed on to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, spatial_dims: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = int(spatial_dims)
        self.thresholds = check_thresholds(thresholds)
        n = len(self.thresholds)
        for name in ("n_true", "n_pred", "tp"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("sum_matched_iou", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, y_true: np.ndarray | torch.Tensor, y_pred: np.ndarray | torch.Tensor) -> None:
        """Add one label image or a batch of them (numpy or torch).

        With ``spatial_dims=2``: ``(H, W)`` or ``(B, H, W)``; with ``spatial_dims=3``: ``(Z, Y, X)``
        or ``(B, Z, Y, X)``. Each image (volume) is matched on its own and the counts pooled.
        """
        true, pred = _as_numpy(y_true), _as_numpy(y_pred)
        if true.shape != pred.shape:
            raise ValueError(f"y_true and y_pred must have the same shape, got {true.shape} and {pred.shape}")
        dims = self.spatial_dims
        if true.ndim == dims:
            true, pred = true[None], pred[None]
        elif true.ndim != dims + 1:
            axes = "(H, W)" if dims == 2 else "(Z, Y, X)"
            raise ValueError(f"expected label images {axes} or batches (B, {axes[1:]}, got shape {true.shape}")
        counts = np.zeros((4, len(self.thresholds)))
        for image_true, image_pred in zip(true, pred):
            for index, stats in enumerate(match_instances(image_true, image_pred, self.thresholds).values()):
                counts[:, index] += (stats.n_true, stats.n_pred, stats.tp, stats.sum_matched_iou)
        device = self.tp.device
        self.n_true += torch.as_tensor(counts[0], dtype=torch.int64, device=device)
        self.n_pred += torch.as_tensor(counts[1], dtype=torch.int64, device=device)
        self.tp += torch.as_tensor(counts[2], dtype=torch.int64, device=device)
        self.sum_matched_iou += torch.as_tensor(counts[3], dtype=torch.float64, device=device)

    def compute(self) -> dict[str, torch.Tensor]:
        """Scores per threshold as ``"<score>@<tau>"`` plus ``"mean_accuracy"`` over the thresholds."""
        result = {}
        accuracies = []
        for index, tau in enumerate(self.thresholds):
            stats = MatchStats(
                tau,
                int(self.n_true[index]),
                int(self.n_pred[index]),
                int(self.tp[index]),
                float(self.sum_matched_iou[index]),
            )
            for score in _SCORES:
                result[f"{score}@{tau:g}"] = torch.tensor(getattr(stats, score))
            accuracies.append(stats.accuracy)
        result["mean_accuracy"] = torch.tensor(float(np.mean(accuracies)))
        return result


def _as_numpy(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu().numpy()
    return np.asarray(labels)
