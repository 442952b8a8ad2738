"""Weighted samplers draw rare classes and foreground as often as they promise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.data.patches import PatchIndex
from bioflow.data.records import ImageRecord
from bioflow.losses.segmentation import FocalLoss
from bioflow.samplers.weighted import ClassWeightedSampler, ForegroundSampler


def index_with_rare_class() -> PatchIndex:
    """Four 32x32 patches of background, one of them with a few pixels of class 2, one of class 1."""
    target = np.zeros((32, 128), np.int64)
    target[5:10, 40:48] = 1  # patch 1: 40 pixels of class 1
    target[3:5, 100:102] = 2  # patch 3: 4 pixels of class 2 (the rarest)
    records = [ImageRecord("a", np.zeros((1, 32, 128), np.float32), target)]
    index = PatchIndex(records, (32, 32), to_classes=lambda t: t)
    keep = index.starts[:, 1] % 32 == 0  # the four non-overlapping candidates
    index.keep(keep)
    return index


def draw_frequencies(sampler, n: int) -> np.ndarray:
    drawn = np.array(list(sampler))
    return np.bincount(drawn, minlength=4) / n


def test_inverse_frequency_weights_by_the_rarest_class_present():
    index = index_with_rare_class()
    counts = index.class_counts()
    assert counts.tolist() == [[1024, 0, 0], [984, 40, 0], [1024, 0, 0], [1020, 0, 4]]
    total = counts.sum()
    w = total / counts.sum(axis=0)  # inverse frequencies of classes 0, 1, 2
    expected = np.array([w[0], w[1], w[0], w[2]])
    expected = expected / expected.sum()
    sampler = ClassWeightedSampler(index, num_samples=200_000, seed=0)
    np.testing.assert_allclose(sampler.weights.numpy(), expected)
    np.testing.assert_allclose(draw_frequencies(sampler, 200_000), expected, atol=0.005)


def test_weight_table_from_the_config():
    index = index_with_rare_class()
    sampler = ClassWeightedSampler(index, num_samples=10, seed=0, class_weights=[1.0, 1.0, 6.0])
    np.testing.assert_allclose(sampler.weights.numpy(), np.array([1, 1, 1, 6]) / 9)
    with pytest.raises(ValueError, match="class_weights has 2 entries"):
        ClassWeightedSampler(index, num_samples=10, seed=0, class_weights=[1.0, 2.0])


def test_foreground_sampler_mixes_foreground_and_uniform_draws():
    index = index_with_rare_class()
    sampler = ForegroundSampler(index, num_samples=100_000, seed=1, foreground_probability=0.6)
    freq = draw_frequencies(sampler, 100_000)
    # foreground patches are 1 and 3: each gets 0.6 / 2 + 0.4 / 4; background ones 0.4 / 4
    np.testing.assert_allclose(freq, [0.1, 0.4, 0.1, 0.4], atol=0.01)


def test_focal_loss_by_hand_and_its_limits():
    logits = torch.log(torch.tensor([[[[0.8, 0.3]], [[0.2, 0.7]]]]))  # p(class 0) = 0.8, 0.3
    target = torch.tensor([[[0, 0]]])
    pt = torch.tensor([0.8, 0.3])
    expected = ((1 - pt) ** 2 * -torch.log(pt)).mean()
    assert FocalLoss(gamma=2.0)(logits, target).item() == pytest.approx(expected.item())
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(ce.item())
    weighted = FocalLoss(gamma=0.0, class_weights=[2.0, 1.0])(logits, torch.tensor([[[0, 1]]]))
    reference = torch.nn.functional.cross_entropy(logits, torch.tensor([[[0, 1]]]), weight=torch.tensor([2.0, 1.0]))
    assert weighted.item() == pytest.approx(reference.item())
