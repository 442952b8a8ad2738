"""Matching metrics against hand-computed cases and brute-force matching over permutations."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from bioflow.metrics.matching import MatchStats, iou_matrix, match_dataset, match_instances


def images_from_overlaps(counts: list[list[int]], true_ids=None, pred_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """Two 1 x N label images with ``counts[t][p]`` pixels of true object t and predicted object
    p (index 0 is background); objects need not be connected, so any overlap table is possible."""
    true_ids = true_ids or list(range(len(counts)))
    pred_ids = pred_ids or list(range(len(counts[0])))
    true, pred = [], []
    for t, row in enumerate(counts):
        for p, n in enumerate(row):
            true += [true_ids[t]] * n
            pred += [pred_ids[p]] * n
    return np.array([true], np.int64), np.array([pred], np.int64)


def brute_force_iou(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    ts, ps = np.unique(y_true[y_true > 0]), np.unique(y_pred[y_pred > 0])
    iou = np.zeros((len(ts), len(ps)))
    for i, t in enumerate(ts):
        for j, p in enumerate(ps):
            inter = np.sum((y_true == t) & (y_pred == p))
            iou[i, j] = inter / np.sum((y_true == t) | (y_pred == p))
    return iou


def brute_force_match(iou: np.ndarray, tau: float) -> tuple[int, float]:
    """Best (count, IoU sum) over all one-to-one assignments, by enumeration."""
    n_true, n_pred = iou.shape
    best = (0, 0.0)
    for perm in itertools.permutations(range(max(n_true, n_pred)), n_true):
        pairs = [(t, p) for t, p in enumerate(perm) if p < n_pred and iou[t, p] >= tau]
        score = (len(pairs), sum(iou[t, p] for t, p in pairs))
        if score[0] > best[0] or (score[0] == best[0] and score[1] > best[1] + 1e-12):
            best = score
    return best


def test_perfect_match_with_any_labels() -> None:
    y_true = np.array([[0, 1, 1, 0, 2], [3, 3, 0, 0, 2]])
    relabel = {0: 0, 1: 70000, 2: 2**40, 3: 5}
    y_pred = np.vectorize(relabel.get)(y_true)
    stats = match_instances(y_true, y_pred, 0.5)[0.5]
    assert (stats.tp, stats.fp, stats.fn, stats.n_true, stats.n_pred) == (3, 0, 0, 3, 3)
    scores = ("precision", "recall", "accuracy", "f1", "mean_matched_score", "mean_true_score", "panoptic_quality")
    for score in scores:
        assert getattr(stats, score) == 1.0
    # Rows: true labels 1, 2, 3; columns: predicted labels sorted, 5 (was 3), 70000 (1), 2**40 (2).
    np.testing.assert_array_equal(iou_matrix(y_true, y_pred), [[0, 1, 0], [0, 0, 1], [1, 0, 0]])


def test_empty_images() -> None:
    objects = np.array([[1, 1, 0, 2]])
    empty = np.zeros_like(objects)
    no_pred = match_instances(objects, empty, 0.5)[0.5]
    assert (no_pred.tp, no_pred.fp, no_pred.fn) == (0, 0, 2)
    assert no_pred.precision == 0.0 and no_pred.recall == 0.0 and no_pred.accuracy == 0.0
    no_true = match_instances(empty, objects, 0.5)[0.5]
    assert (no_true.tp, no_true.fp, no_true.fn) == (0, 2, 0)
    assert no_true.f1 == 0.0 and no_true.panoptic_quality == 0.0
    nothing = match_instances(empty, empty, 0.5)[0.5].as_dict()
    assert all(nothing[name] == 0 for name in nothing if name != "threshold")
    assert iou_matrix(empty, objects).shape == (0, 2)


def test_optimal_not_greedy_count() -> None:
    # T1 overlaps P1 best, but giving P1 to T2 and P2 to T1 matches both.
    y_true, y_pred = images_from_overlaps([[0, 0, 0], [0, 7, 3], [5, 5, 0]])
    # |T1| = 10, |T2| = 10, |P1| = 12, |P2| = 3
    iou_t1p1, iou_t1p2, iou_t2p1 = Fraction(7, 15), Fraction(3, 10), Fraction(5, 17)
    expected = [[float(iou_t1p1), float(iou_t1p2)], [float(iou_t2p1), 0.0]]
    np.testing.assert_allclose(iou_matrix(y_true, y_pred), expected)
    stats = match_instances(y_true, y_pred, 0.25)[0.25]
    assert stats.tp == 2  # a greedy (highest IoU first) matching would find only T1-P1
    assert stats.sum_matched_iou == pytest.approx(float(iou_t1p2 + iou_t2p1))
    assert stats.accuracy == 1.0
    assert stats.mean_matched_score == pytest.approx(float((iou_t1p2 + iou_t2p1) / 2))


def test_equal_counts_prefer_higher_iou() -> None:
    y_true, y_pred = images_from_overlaps([[0, 0, 0], [0, 5, 3], [0, 3, 4]])
    # IoUs: T1P1 5/11, T1P2 3/12, T2P1 3/12, T2P2 4/10; both assignments match two pairs.
    stats = match_instances(y_true, y_pred, 0.1)[0.1]
    assert stats.tp == 2
    assert stats.sum_matched_iou == pytest.approx(5 / 11 + 4 / 10)
    assert stats.panoptic_quality == pytest.approx((5 / 11 + 4 / 10) / 2)


def test_iou_exactly_at_threshold_matches() -> None:
    y_true, y_pred = images_from_overlaps([[0, 0], [1, 1]])  # IoU = 1 / 2 exactly
    assert match_instances(y_true, y_pred, 0.5)[0.5].tp == 1
    assert match_instances(y_true, y_pred, 0.5000001)[0.5000001].tp == 0


def test_scores_by_hand() -> None:
    # Three true objects, four predicted; at tau = 0.5 two pairs match with IoU 1 and 0.6.
    y_true, y_pred = images_from_overlaps(
        [[0, 0, 0, 3, 2], [0, 4, 0, 0, 0], [2, 0, 3, 0, 0], [5, 0, 0, 0, 0]], pred_ids=[0, 9, 700000, 11, 12]
    )
    stats = match_instances(y_true, y_pred, [0.5])[0.5]
    assert (stats.tp, stats.fp, stats.fn) == (2, 2, 1)
    assert stats.sum_matched_iou == pytest.approx(1.6)
    assert stats.precision == pytest.approx(2 / 4)
    assert stats.recall == pytest.approx(2 / 3)
    assert stats.accuracy == pytest.approx(2 / 5)
    assert stats.f1 == pytest.approx(4 / 7)
    assert stats.mean_matched_score == pytest.approx(0.8)
    assert stats.mean_true_score == pytest.approx(1.6 / 3)
    assert stats.panoptic_quality == pytest.approx(1.6 / (2 + 1 + 0.5))


@pytest.mark.parametrize("seed", range(25))
def test_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, (5, 6)) * rng.choice([1, 1000])
    y_pred = rng.integers(0, 5, (5, 6))
    iou = iou_matrix(y_true, y_pred)
    np.testing.assert_allclose(iou, brute_force_iou(y_true, y_pred))
    for tau, stats in match_instances(y_true, y_pred, (0.1, 0.2, 0.3, 0.5)).items():
        count, total = brute_force_match(iou, tau)
        assert stats.tp == count
        assert stats.sum_matched_iou == pytest.approx(total)


def test_dataset_pools_counts_not_ratios() -> None:
    a_true, a_pred = images_from_overlaps([[0, 0], [0, 4]])  # one perfect match
    b_true, b_pred = images_from_overlaps([[0, 3, 3], [2, 0, 0], [2, 0, 0]])  # nothing matches
    pooled = match_dataset([(a_true, a_pred), (b_true, b_pred)], [0.5])[0.5]
    assert (pooled.tp, pooled.fp, pooled.fn, pooled.n_true, pooled.n_pred) == (1, 2, 2, 3, 3)
    assert pooled.accuracy == pytest.approx(1 / 5)  # the mean of per-image accuracies would be 1/2
    same = match_dataset([a_true, b_true], [0.5], y_pred=[a_pred, b_pred])[0.5]
    assert same == pooled
    per_image = [match_instances(t, p, 0.5)[0.5] for t, p in ((a_true, a_pred), (b_true, b_pred))]
    assert per_image[0] + per_image[1] == pooled
    with pytest.raises(ValueError):
        match_dataset([a_true], y_pred=[a_pred, b_pred])
    with pytest.raises(ValueError):
        MatchStats(0.5, 1, 1, 1, 1.0) + MatchStats(0.6, 1, 1, 1, 1.0)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        iou_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(TypeError):
        iou_matrix(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError):
        match_instances(np.zeros((2, 2), int), np.zeros((2, 2), int), [0.0])
