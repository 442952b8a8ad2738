"""The StarDist loss: binary cross-entropy on the object probability plus weighted distance error."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class StarDistLoss(nn.Module):
    """``prob_weight * BCE(prob) + dist_weight * MAE(distances, weighted by the target probability)``.

    Predictions are ``(N, 1 + R, H, W)``: a probability logit and R distances. Targets are
    ``(N, 2 + R, H, W)``: the object probability, R distances, and a validity mask (0 where the
    patch was padded). The distance term is ``sum(p * |d - d*|) / (R * sum(valid))`` with ``p`` the
    target probability, so pixels near object centres count most and background not at all.

    Parameters
    ----------
    prob_weight, dist_weight
        Weights of the two terms (1 and 0.2 by default, as in the StarDist paper's code).
    """

    bioflow_spatial_dims = (2,)

    def __init__(self, prob_weight: float = 1.0, dist_weight: float = 0.2) -> None:
        super().__init__()
        self.prob_weight = prob_weight
        self.dist_weight = dist_weight

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n_rays = prediction.shape[1] - 1
        if target.shape[1] != n_rays + 2:
            raise ValueError(f"target has {target.shape[1]} channels, expected {n_rays + 2} (prob, {n_rays} rays, valid)")
        prob_t, dist_t, valid = target[:, 0], target[:, 1:-1], target[:, -1]
        count = valid.sum().clamp(min=1.0)
        bce = F.binary_cross_entropy_with_logits(prediction[:, 0], prob_t, reduction="none")
        prob_term = (bce * valid).sum() / count
        error = (prediction[:, 1:] - dist_t).abs() * (prob_t * valid)[:, None]
        dist_term = error.sum() / (count * n_rays)
        return self.prob_weight * prob_term + self.dist_weight * dist_term

    @staticmethod
    def example_inputs(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A prediction and a target of the right shapes (2D; StarDist is 2D)."""
        g = torch.Generator().manual_seed(0)
        prediction = torch.randn(2, 9, 12, 12, generator=g)
        target = torch.cat([torch.rand(2, 1, 12, 12, generator=g), 5 * torch.rand(2, 8, 12, 12, generator=g),
                            torch.ones(2, 1, 12, 12)], dim=1)
        return prediction, target
