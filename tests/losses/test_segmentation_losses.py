"""Segmentation losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from bioflow.losses.segmentation import IGNORE_INDEX, CrossEntropyDiceLoss, CrossEntropyLoss, DiceLoss

# Two pixels, two classes. Logits chosen so that softmax probabilities are simple.
LOGITS = torch.tensor([[[[math.log(3.0), 0.0]], [[0.0, math.log(3.0)]]]])  # (1, 2, 1, 2)
# pixel 0: p = (0.75, 0.25); pixel 1: p = (0.25, 0.75)
TARGET = torch.tensor([[[0, 0]]])  # both pixels class 0


def test_cross_entropy_by_hand():
    expected = -(math.log(0.75) + math.log(0.25)) / 2
    assert CrossEntropyLoss()(LOGITS, TARGET).item() == pytest.approx(expected)


def test_class_weighted_cross_entropy_by_hand():
    target = torch.tensor([[[0, 1]]])
    # both pixels have p(true) = 0.75; weights 1 and 3 -> weighted mean of equal terms
    assert CrossEntropyLoss([1.0, 3.0])(LOGITS, target).item() == pytest.approx(-math.log(0.75))
    target = torch.tensor([[[0, 0]]])
    w = (1 * -math.log(0.75) + 1 * -math.log(0.25)) / 2
    assert CrossEntropyLoss([1.0, 3.0])(LOGITS, target).item() == pytest.approx(w)


def test_ignored_pixels_do_not_count():
    target = torch.tensor([[[0, IGNORE_INDEX]]])
    assert CrossEntropyLoss()(LOGITS, target).item() == pytest.approx(-math.log(0.75))
    assert DiceLoss(smooth=0.0)(LOGITS, target).item() == pytest.approx(1 - (2 * 0.75 / (0.75 + 1) + 2 * 0 / (0.25 + 0)) / 2)


def test_dice_by_hand():
    # class 0: intersection 0.75 + 0.25 = 1, sum p = 1, sum g = 2 -> 2/3
    # class 1: intersection 0, sum p = 1, sum g = 0 -> 0 (smooth 0)
    assert DiceLoss(smooth=0.0)(LOGITS, TARGET).item() == pytest.approx(1 - (2 / 3 + 0) / 2)
    assert DiceLoss(smooth=0.0, include_background=False)(LOGITS, TARGET).item() == pytest.approx(1.0)
    # with smoothing 1: class 0 (2+1)/(3+1), class 1 (0+1)/(1+1)
    assert DiceLoss(smooth=1.0)(LOGITS, TARGET).item() == pytest.approx(1 - (3 / 4 + 1 / 2) / 2)


def test_sum_is_the_weighted_sum():
    combined = CrossEntropyDiceLoss(ce_weight=2.0, dice_weight=0.5, smooth=0.0)(LOGITS, TARGET)
    expected = 2.0 * CrossEntropyLoss()(LOGITS, TARGET) + 0.5 * DiceLoss(smooth=0.0)(LOGITS, TARGET)
    assert combined.item() == pytest.approx(expected.item())


def test_perfect_prediction_gives_near_zero_dice_loss_and_gradients_flow():
    logits = torch.tensor([[[[20.0, -20.0]], [[-20.0, 20.0]]]], requires_grad=True)
    target = torch.tensor([[[0, 1]]])
    loss = CrossEntropyDiceLoss()(logits, target)
    assert loss.item() < 1e-6
    CrossEntropyDiceLoss()(LOGITS.clone().requires_grad_(), TARGET).backward()


def test_wrong_number_of_class_weights():
    with pytest.raises(ValueError, match="class_weights has 3 entries"):
        CrossEntropyLoss([1.0, 1.0, 1.0])(LOGITS, TARGET)


def test_all_ignored_gives_zero_with_a_graph():
    logits = LOGITS.clone().requires_grad_()
    loss = CrossEntropyLoss()(logits, torch.full((1, 1, 2), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
