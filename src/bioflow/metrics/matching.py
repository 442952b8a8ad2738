"""Matching of instance segmentations: IoU between objects and one-to-one matching scores.

Objects are the connected or not connected sets of pixels sharing a positive label (0 is
background); labels may be any non-negative integers. For a threshold ``tau`` the matching is the
one-to-one assignment of true to predicted objects that maximises the number of pairs with
``IoU >= tau`` and, among those, the sum of their IoUs; only pairs with ``IoU >= tau`` count as
matched (true positives, TP). With ``n_true`` and ``n_pred`` objects, ``FP = n_pred - TP`` and
``FN = n_true - TP``, and

* precision ``TP / (TP + FP)``, recall ``TP / (TP + FN)``,
* accuracy ``TP / (TP + FP + FN)``, F1 ``2 TP / (2 TP + FP + FN)``,
* mean_matched_score ``sum IoU(TP) / TP``, mean_true_score ``sum IoU(TP) / n_true``,
* panoptic_quality ``sum IoU(TP) / (TP + FP / 2 + FN / 2)``,

each 0 where it is 0 / 0. Over a dataset, counts and IoU sums are added over the images first and
the ratios computed from the totals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

# Up to this many (true + 1) x (pred + 1) cells the pair counts come from a dense bincount, above
# it from the distinct label pairs (a sort).
_DENSE_CELLS = 1 << 24


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator else 0.0


@dataclass(frozen=True)
class MatchStats:
    """Matching counts at one IoU threshold; the scores are derived properties.

    Adding two ``MatchStats`` of the same threshold pools them (counts and IoU sums add up).
    """

    threshold: float
    n_true: int
    n_pred: int
    tp: int
    sum_matched_iou: float

    @property
    def fp(self) -> int:
        """False positives: predicted objects without a match."""
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        """False negatives: true objects without a match."""
        return self.n_true - self.tp

    @property
    def precision(self) -> float:
        """TP / (TP + FP)."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """TP / (TP + FN)."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def accuracy(self) -> float:
        """TP / (TP + FP + FN)."""
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN)."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def mean_matched_score(self) -> float:
        """Mean IoU of the matched pairs."""
        return _ratio(self.sum_matched_iou, self.tp)

    @property
    def mean_true_score(self) -> float:
        """Summed IoU of the matched pairs per true object."""
        return _ratio(self.sum_matched_iou, self.n_true)

    @property
    def panoptic_quality(self) -> float:
        """Summed IoU of the matched pairs / (TP + FP / 2 + FN / 2)."""
        return _ratio(self.sum_matched_iou, self.tp + self.fp / 2 + self.fn / 2)

    def __add__(self, other: MatchStats) -> MatchStats:
        if other.threshold != self.threshold:
            raise ValueError(f"cannot pool thresholds {self.threshold} and {other.threshold}")
        return MatchStats(
            self.threshold,
            self.n_true + other.n_true,
            self.n_pred + other.n_pred,
            self.tp + other.tp,
            self.sum_matched_iou + other.sum_matched_iou,
        )

    def as_dict(self) -> dict[str, float]:
        """All counts and scores by name."""
        names = (
            "threshold", "n_true", "n_pred", "tp", "fp", "fn", "sum_matched_iou", "precision", "recall",
            "accuracy", "f1", "mean_matched_score", "mean_true_score", "panoptic_quality",
        )
        return {name: getattr(self, name) for name in names}


def _label_image(labels: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label image, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must be non-negative (0 is background)")
    return array


def iou_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """IoU of every true object with every predicted object.

    Parameters
    ----------
    y_true, y_pred : np.ndarray
        Integer label images of the same shape; 0 is background.

    Returns
    -------
    np.ndarray
        float64 (n_true, n_pred); rows follow the true labels and columns the predicted labels in
        increasing order (``np.unique`` of the positive labels).
    """
    pairs = _PairIoUs.of(y_true, y_pred)
    dense = np.zeros((pairs.n_true, pairs.n_pred))
    dense[pairs.rows, pairs.cols] = pairs.ious
    return dense


@dataclass(frozen=True)
class _PairIoUs:
    """IoUs of the object pairs that overlap at all (all others are 0), in sparse form."""

    n_true: int
    n_pred: int
    rows: np.ndarray
    cols: np.ndarray
    ious: np.ndarray

    @classmethod
    def of(cls, y_true: np.ndarray, y_pred: np.ndarray) -> _PairIoUs:
        true = _label_image(y_true, "y_true")
        pred = _label_image(y_pred, "y_pred")
        if true.shape != pred.shape:
            raise ValueError(f"y_true and y_pred must have the same shape, got {true.shape} and {pred.shape}")
        true_index, n_true = _compact(true.ravel())
        pred_index, n_pred = _compact(pred.ravel())
        # One pass over the pixels: each pixel's (true, pred) pair as one code, then counted.
        codes = true_index * (n_pred + 1) + pred_index
        cells = (n_true + 1) * (n_pred + 1)
        if cells <= _DENSE_CELLS:
            counts = np.bincount(codes, minlength=cells)
            pair_codes = np.flatnonzero(counts)
            counts = counts[pair_codes]
        else:
            pair_codes, counts = np.unique(codes, return_counts=True)
        true_sizes = np.bincount(true_index, minlength=n_true + 1)
        pred_sizes = np.bincount(pred_index, minlength=n_pred + 1)
        rows, cols = np.divmod(pair_codes, n_pred + 1)
        objects = (rows > 0) & (cols > 0)
        rows, cols, counts = rows[objects], cols[objects], counts[objects].astype(np.float64)
        ious = counts / (true_sizes[rows] + pred_sizes[cols] - counts)
        return cls(n_true, n_pred, rows - 1, cols - 1, ious)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels mapped to 0 (background) and 1..K in increasing order; and K."""
    top = int(labels.max()) if labels.size else 0
    if top <= 4 * labels.size + 1024:
        # A lookup table is linear time and avoids the sort of np.unique.
        present = np.zeros(top + 1, dtype=bool)
        present[labels] = True
        present[0] = False
        lut = np.cumsum(present) * present
        return lut[labels].astype(np.int64), int(present.sum())
    ids, index = np.unique(labels, return_inverse=True)
    index = index.ravel().astype(np.int64)
    if ids.size and ids[0] == 0:
        return index, ids.size - 1
    return index + 1, ids.size


def _matched_ious(pairs: _PairIoUs, threshold: float) -> np.ndarray:
    """IoUs of the optimal one-to-one matching's pairs with ``IoU >= threshold``.

    The graph of pairs at or above the threshold falls apart into small connected components
    (for thresholds above 0.5 every object has at most one such partner), each solved on its own.
    Within a component the cost counts a matched pair as ``-(1 + IoU / (k + 1))`` with ``k`` the
    size of the smaller side: any additional pair outweighs every possible gain in summed IoU, so
    the count is maximised first and the IoU sum second.
    """
    candidate = pairs.ious >= threshold
    rows, cols, ious = pairs.rows[candidate], pairs.cols[candidate], pairs.ious[candidate]
    if rows.size == 0:
        return np.zeros(0)
    n_nodes = pairs.n_true + pairs.n_pred
    graph = sparse.coo_matrix((np.ones(rows.size), (rows, pairs.n_true + cols)), shape=(n_nodes, n_nodes))
    _, component = connected_components(graph, directed=False)
    pair_component = component[rows]
    order = np.argsort(pair_component, kind="stable")
    bounds = np.flatnonzero(np.diff(pair_component[order])) + 1
    matched = []
    for group in np.split(order, bounds):
        if group.size == 1:
            matched.append(ious[group])
            continue
        sub_rows, row_index = np.unique(rows[group], return_inverse=True)
        sub_cols, col_index = np.unique(cols[group], return_inverse=True)
        sub = np.zeros((sub_rows.size, sub_cols.size))
        sub[row_index, col_index] = ious[group]
        valid = np.zeros(sub.shape, dtype=bool)
        valid[row_index, col_index] = True
        bonus = 1.0 / (min(sub.shape) + 1)
        r, c = linear_sum_assignment(np.where(valid, -(1.0 + bonus * sub), 0.0))
        keep = valid[r, c]
        matched.append(sub[r[keep], c[keep]])
    return np.concatenate(matched)


def match_instances(
    y_true: np.ndarray, y_pred: np.ndarray, thresholds: float | Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[float, MatchStats]:
    """Match the objects of two label images at each IoU threshold.

    Parameters
    ----------
    y_true, y_pred : np.ndarray
        Integer label images of the same shape; 0 is background.
    thresholds : float or sequence of float
        IoU thresholds ``tau``; a pair matches when ``IoU >= tau``.

    Returns
    -------
    dict of float to MatchStats
        One :class:`MatchStats` per threshold, keyed by the threshold.
    """
    pairs = _PairIoUs.of(y_true, y_pred)
    result = {}
    for tau in check_thresholds(thresholds):
        ious = _matched_ious(pairs, tau)
        result[tau] = MatchStats(tau, pairs.n_true, pairs.n_pred, int(ious.size), float(ious.sum()))
    return result


def check_thresholds(thresholds: float | Sequence[float]) -> tuple[float, ...]:
    """IoU thresholds as a tuple of floats, each in (0, 1] (a single threshold may be given bare)."""
    taus = (float(thresholds),) if np.isscalar(thresholds) else tuple(float(t) for t in thresholds)
    if not taus or any(not 0.0 < tau <= 1.0 for tau in taus):
        raise ValueError(f"thresholds must be in (0, 1], got {taus}")
    return taus


def match_dataset(
    y_true: Iterable[np.ndarray] | Iterable[tuple[np.ndarray, np.ndarray]],
    thresholds: float | Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    y_pred: Iterable[np.ndarray] | None = None,
) -> dict[float, MatchStats]:
    """Match a dataset of label images, pooling counts and IoU sums over the images.

    Parameters
    ----------
    y_true : iterable
        ``(y_true, y_pred)`` pairs of label images; or, when ``y_pred`` is given, the true label
        images alone.
    thresholds : float or sequence of float
        IoU thresholds.
    y_pred : iterable, optional
        Predicted label images, in the order of ``y_true``.

    Returns
    -------
    dict of float to MatchStats
        Pooled statistics per threshold (ratios computed from the pooled counts).
    """
    if y_pred is None:
        pairs = list(y_true)
    else:
        true_list, pred_list = list(y_true), list(y_pred)
        if len(true_list) != len(pred_list):
            raise ValueError(f"got {len(true_list)} true and {len(pred_list)} predicted images")
        pairs = list(zip(true_list, pred_list))
    taus = check_thresholds(thresholds)
    pooled = {tau: MatchStats(tau, 0, 0, 0, 0.0) for tau in taus}
    for true, pred in pairs:
        for tau, stats in match_instances(true, pred, taus).items():
            pooled[tau] = pooled[tau] + stats
    return pooled
