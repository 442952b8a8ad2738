"""Restoration losses by hand."""

from __future__ import annotations

import pytest
import torch

from bioflow.losses.restoration import MAELoss, MaskedMSELoss, MSELoss


def test_mae_and_mse():
    p, t = torch.tensor([[[[1.0, 2.0, 5.0]]]]), torch.tensor([[[[0.0, 4.0, 5.0]]]])
    assert MAELoss()(p, t).item() == pytest.approx((1 + 2 + 0) / 3)
    assert MSELoss()(p, t).item() == pytest.approx((1 + 4 + 0) / 3)


def test_masked_mse_counts_masked_pixels_only():
    prediction = torch.tensor([[[[1.0, 2.0, 5.0, 9.0]]]], requires_grad=True)
    values = torch.tensor([[[[0.0, 4.0, 5.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])
    loss = MaskedMSELoss()(prediction, torch.cat([values, mask], dim=1))
    assert loss.item() == pytest.approx((1 + 4) / 2)
    loss.backward()
    assert prediction.grad[0, 0, 0, 2:].abs().sum() == 0  # unmasked pixels get no gradient
    empty = MaskedMSELoss()(prediction, torch.cat([values, torch.zeros_like(mask)], dim=1))
    assert empty.item() == 0.0
