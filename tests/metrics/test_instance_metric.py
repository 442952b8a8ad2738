"""The torchmetrics wrapper against match_dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.metrics.instance import InstanceMatchingMetric
from bioflow.metrics.matching import match_dataset

SCORES = ("precision", "recall", "accuracy", "f1", "mean_matched_score", "mean_true_score", "panoptic_quality")


def random_labels(seed: int, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Batches of blocky label images and noisy copies of them as predictions."""
    rng = np.random.default_rng(seed)
    true = np.kron(rng.integers(0, 6, (n, 6, 6)), np.ones((1, 4, 4), np.int64))
    pred = true.copy()
    flip = rng.random(pred.shape) < 0.15
    pred[flip] = rng.integers(0, 8, flip.sum())
    return true, pred * 17


def test_matches_pooled_dataset_scores() -> None:
    thresholds = (0.3, 0.5, 0.75)
    metric = InstanceMatchingMetric(thresholds)
    images = []
    for seed in range(3):
        true, pred = random_labels(seed)
        metric.update(torch.from_numpy(true), torch.from_numpy(pred))  # a batch, as tensors
        images += list(zip(true, pred))
    true, pred = random_labels(10, n=1)
    metric.update(true[0], pred[0])  # a single image, as numpy arrays
    images.append((true[0], pred[0]))

    result = metric.compute()
    expected = match_dataset(images, thresholds=thresholds)
    assert set(result) == {f"{score}@{tau:g}" for score in SCORES for tau in thresholds} | {"mean_accuracy"}
    for tau, stats in expected.items():
        for score in SCORES:
            assert float(result[f"{score}@{tau:g}"]) == pytest.approx(getattr(stats, score), rel=1e-6)
    mean = np.mean([stats.accuracy for stats in expected.values()])
    assert float(result["mean_accuracy"]) == pytest.approx(mean, rel=1e-6)


def test_states_add_up_across_processes() -> None:
    # What a DDP all-reduce does: each state is summed over the ranks.
    parts = [random_labels(seed) for seed in range(4)]
    ranks = [InstanceMatchingMetric((0.5,)), InstanceMatchingMetric((0.5,))]
    for index, (true, pred) in enumerate(parts):
        ranks[index % 2].update(true, pred)
    assert {fx.__name__ for fx in ranks[0]._reductions.values()} == {"dim_zero_sum"}
    ranks[0].merge_state(ranks[1])
    single = InstanceMatchingMetric((0.5,))
    for true, pred in parts:
        single.update(true, pred)
    for name in ("n_true", "n_pred", "tp", "sum_matched_iou"):
        torch.testing.assert_close(getattr(ranks[0], name), getattr(single, name))
    assert float(ranks[0].compute()["accuracy@0.5"]) == pytest.approx(float(single.compute()["accuracy@0.5"]))


def test_reset_and_errors() -> None:
    metric = InstanceMatchingMetric((0.5,))
    true, pred = random_labels(1, n=1)
    metric.update(true, pred)
    metric.reset()
    assert int(metric.n_true.sum()) == 0
    with pytest.raises(ValueError):
        metric.update(true[0], pred[0, :-1])
    with pytest.raises(ValueError):
        metric.update(true[None], pred[None])
    with pytest.raises(ValueError):
        InstanceMatchingMetric((1.5,))
