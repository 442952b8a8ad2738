"""Dice and IoU per class against hand-computed confusion counts."""

from __future__ import annotations

import math

import pytest
import torch

from bioflow.losses.segmentation import IGNORE_INDEX
from bioflow.metrics.segmentation import SegmentationScores


def test_scores_by_hand_pooled_over_images():
    metric = SegmentationScores(3, ["bg", "a", "b"])
    # image 1: truth / prediction
    metric.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 2]]))
    # image 2 (one pixel ignored)
    metric.update(torch.tensor([[1, 1, 0, 0]]), torch.tensor([[1, 0, 0, IGNORE_INDEX]]))
    scores = metric.compute()
    # counted pixels (truth, pred): (0,0) (1,1) (2,1) (2,2) (1,1) (0,1) (0,0)
    # bg: TP 2, FP 0, FN 1 ; a: TP 2, FP 1 (truth 0 pred 1), FN 1 (truth 2 pred 1) ; b: TP 1, FP 1, FN 0
    assert scores["dice_bg"].item() == pytest.approx(4 / 5)
    assert scores["dice_a"].item() == pytest.approx(4 / 6)
    assert scores["dice_b"].item() == pytest.approx(2 / 3)
    assert scores["iou_bg"].item() == pytest.approx(2 / 3)
    assert scores["iou_a"].item() == pytest.approx(2 / 4)
    assert scores["iou_b"].item() == pytest.approx(1 / 2)
    assert scores["dice_mean"].item() == pytest.approx((4 / 5 + 4 / 6 + 2 / 3) / 3)
    assert scores["dice_fg_mean"].item() == pytest.approx((4 / 6 + 2 / 3) / 2)


def test_absent_class_is_undefined_and_skipped_in_means():
    metric = SegmentationScores(3)
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    scores = metric.compute()
    assert math.isnan(scores["dice_class2"].item())
    assert scores["dice_mean"].item() == pytest.approx(1.0)
    assert scores["iou_fg_mean"].item() == pytest.approx(1.0)


def test_reference_against_sklearn_style_counting():
    torch.manual_seed(0)
    pred = torch.randint(0, 4, (3, 17, 19))
    truth = torch.randint(0, 4, (3, 17, 19))
    metric = SegmentationScores(4)
    metric.update(pred, truth)
    scores = metric.compute()
    for k in range(4):
        tp = ((pred == k) & (truth == k)).sum().item()
        fp = ((pred == k) & (truth != k)).sum().item()
        fn = ((pred != k) & (truth == k)).sum().item()
        assert scores[f"dice_class{k}"].item() == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert scores[f"iou_class{k}"].item() == pytest.approx(tp / (tp + fp + fn))
