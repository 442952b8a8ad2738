"""The StarDist loss: binary cross-entropy on the object probability plus weighted distance error."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F


class StarDistLoss(nn.Module):
    """``prob_weight * BCE(prob) + dist_weight * weighted MAE(distances) + background_reg * |d| off objects``.

    Predictions are ``(N, 1 + R, *spatial)`` (2D or 3D): a probability logit and R distances.
    Targets are ``(N, 2 + R, *spatial)``: the object probability ``p``, R distances, and a validity
    mask (0 where the patch was padded or the labels are unknown).

    * probability: mean binary cross-entropy over the valid pixels;
    * distances: ``sum(p * |d - d*|) / (R * sum(p))`` with ``dist_norm="prob"`` (the reference
      StarDist's normalisation: the mean error per ray of a typical object pixel, whatever the
      share of the patch the objects cover) or ``/ (R * valid pixels)`` with ``"pixels"`` (which
      makes the distance term shrink with the object coverage of the patch);
    * background: ``background_reg * mean((1 - p) * |d|)``, pulling distances to 0 where there is
      no object (the reference uses 1e-4).

    Parameters
    ----------
    prob_weight, dist_weight
        Weights of the two main terms (1 and 0.2 by default, as in the reference).
    dist_norm
        ``prob`` or ``pixels`` (see above).
    background_reg
        Weight of the background term (0: off).
    """

    bioflow_spatial_dims = (2, 3)
    bioflow_targets = ("stardist",)

    def __init__(self, prob_weight: float = 1.0, dist_weight: float = 0.2,
                 dist_norm: Literal["prob", "pixels"] = "prob", background_reg: float = 1e-4) -> None:
        super().__init__()
        if dist_norm not in ("prob", "pixels"):
            raise ValueError(f"dist_norm must be 'prob' or 'pixels', got {dist_norm!r}")
        self.prob_weight = prob_weight
        self.dist_weight = dist_weight
        self.dist_norm = dist_norm
        self.background_reg = background_reg

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n_rays = prediction.shape[1] - 1
        if target.shape[1] != n_rays + 2:
            raise ValueError(f"target has {target.shape[1]} channels, expected {n_rays + 2} (prob, {n_rays} rays, valid)")
        # One split (its gradient is one concatenation) rather than slices (each a zero-filled
        # gradient of the whole prediction).
        logit, dist = prediction.float().split([1, n_rays], dim=1)
        prob_t, dist_t, valid = target[:, :1], target[:, 1:-1], target[:, -1:]
        count = valid.sum().clamp(min=1.0)
        bce = F.binary_cross_entropy_with_logits(logit, prob_t, reduction="none")
        loss = self.prob_weight * (bce * valid).sum() / count
        weight = prob_t * valid
        error = ((dist - dist_t).abs() * weight).sum()
        norm = weight.sum().clamp(min=1e-6) if self.dist_norm == "prob" else count
        loss = loss + self.dist_weight * error / (norm * n_rays)
        if self.background_reg:
            off = (1 - prob_t) * valid
            loss = loss + self.background_reg * (dist.abs() * off).sum() / (count * n_rays)
        return loss

    @staticmethod
    def bioflow_example_inputs(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A prediction and a target of the right shapes (8 rays)."""
        g = torch.Generator().manual_seed(0)
        spatial = (12,) * spatial_dims
        prediction = torch.randn(2, 9, *spatial, generator=g)
        target = torch.cat([torch.rand(2, 1, *spatial, generator=g), 5 * torch.rand(2, 8, *spatial, generator=g),
                            torch.ones(2, 1, *spatial)], dim=1)
        return prediction, target
