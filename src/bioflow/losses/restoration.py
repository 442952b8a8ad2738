"""Losses for image restoration: MAE and MSE against a target image, and Noise2Void's masked MSE."""

from __future__ import annotations

import torch
from torch import nn


class MAELoss(nn.Module):
    """Mean absolute error between prediction and target (CARE's usual loss)."""

    bioflow_targets = ("image",)
    #: Its likelihood form, trained by ``task.probabilistic=true`` (losses.likelihood).
    bioflow_probabilistic = "laplace_nll"

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction - target).abs().mean()

    @staticmethod
    def bioflow_example_inputs(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        shape = (2, 1) + (12,) * spatial_dims
        return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


class MSELoss(MAELoss):
    """Mean squared error between prediction and target."""

    bioflow_probabilistic = "gaussian_nll"

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction - target).square().mean()


class MaskedMSELoss(nn.Module):
    """Mean squared error over masked pixels only (Noise2Void).

    The target stacks the original values and the mask along the channel axis: ``(N, 2C, ...)``,
    channels ``:C`` the values the network must predict, ``C:`` 1 where the loss counts. An empty
    mask gives 0 (with a graph).
    """

    bioflow_targets = ("masked_image",)
    bioflow_probabilistic = "masked_gaussian_nll"

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        channels = prediction.shape[1]
        return masked_mse(prediction, target[:, :channels], target[:, channels:] > 0.5)

    @staticmethod
    def bioflow_example_inputs(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        shape = (2, 1) + (16,) * spatial_dims
        mask = (torch.rand(shape, generator=g) < 0.1).float()
        return torch.randn(shape, generator=g), torch.cat([torch.randn(shape, generator=g), mask], dim=1)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels only (the Noise2Void loss).

    Parameters
    ----------
    prediction
        Network output, same shape as ``target``.
    target
        Original (unmasked) noisy batch.
    mask
        Boolean tensor of the same shape, True at the blind spots.

    Returns
    -------
    torch.Tensor
        Scalar ``sum(mask * (prediction - target)**2) / sum(mask)``; 0 (still attached to the
        graph of ``prediction``) when the mask is empty.
    """
    if prediction.shape != target.shape or mask.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)}, target {tuple(target.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    squared = torch.where(mask, (prediction - target).square(), 0.0)
    # clamping the count keeps an empty mask at 0 without a data-dependent branch (no device sync)
    return squared.sum() / mask.sum().clamp(min=1)
