"""Losses for semantic segmentation: cross-entropy, soft Dice, and their weighted sum.

Predictions are logits of shape (N, K, *spatial); targets are class indices of shape (N, *spatial)
where ``IGNORE_INDEX`` marks pixels that do not count (padding, unlabelled regions).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from bioflow.conventions import IGNORE_INDEX


class CrossEntropyLoss(nn.Module):
    """Pixel-wise cross-entropy, optionally with one weight per class.

    Parameters
    ----------
    class_weights
        One weight per class (background first), or ``None`` for equal weights. With weights, the
        loss is the weighted mean ``sum_i w[y_i] * ce_i / sum_i w[y_i]`` over counted pixels.
    """

    bioflow_targets = ("classes",)

    def __init__(self, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.class_weights
        if weight is not None and weight.numel() != prediction.shape[1]:
            raise ValueError(
                f"class_weights has {weight.numel()} entries but the network predicts "
                f"{prediction.shape[1]} classes"
            )
        if not (target != IGNORE_INDEX).any():
            return prediction.sum() * 0.0  # nothing to learn from; keep the graph
        return F.cross_entropy(prediction, target.long(), weight=weight, ignore_index=IGNORE_INDEX)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy down-weighted where the network is already sure.

    ``mean_i w[y_i] (1 - p_i)^gamma (-log p_i)`` over counted pixels, normalised by the summed class
    weights; ``p_i`` is the predicted probability of the true class. ``gamma = 0`` gives the
    (class-weighted) cross-entropy. Easy, plentiful pixels (usually background) contribute little,
    which helps rare classes without changing what the network sees.

    Parameters
    ----------
    gamma
        Focusing exponent.
    class_weights
        Optional weight per class (background first).
    """

    bioflow_targets = ("classes",)

    def __init__(self, gamma: float = 2.0, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != IGNORE_INDEX
        if not valid.any():
            return prediction.sum() * 0.0
        log_p = F.log_softmax(prediction, dim=1)
        t = target.long().clamp(min=0)
        log_pt = log_p.gather(1, t.unsqueeze(1)).squeeze(1)
        weight = torch.ones_like(log_pt) if self.class_weights is None else self.class_weights[t]
        weight = weight * valid
        focal = (1 - log_pt.exp()).pow(self.gamma) * (-log_pt)
        return (weight * focal).sum() / weight.sum().clamp(min=1e-12)


class DiceLoss(nn.Module):
    """Soft Dice loss: ``1 - mean_k (2 sum p_k g_k + s) / (sum p_k + sum g_k + s)``.

    Sums run over all counted pixels of the batch; ``p_k`` is the softmax probability of class
    ``k`` and ``g_k`` its one-hot target.

    Parameters
    ----------
    smooth
        ``s`` above; keeps the ratio defined for classes absent from both target and prediction.
    include_background
        Whether class 0 takes part in the mean.
    """

    bioflow_targets = ("classes",)

    def __init__(self, smooth: float = 1.0, include_background: bool = True) -> None:
        super().__init__()
        self.smooth = smooth
        self.include_background = include_background

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = prediction.shape[1]
        valid = (target != IGNORE_INDEX).unsqueeze(1).to(prediction.dtype)
        probs = prediction.softmax(dim=1) * valid
        onehot = F.one_hot(target.long().clamp(min=0), num_classes).movedim(-1, 1).to(prediction.dtype) * valid
        dims = (0, *range(2, prediction.ndim))
        intersection = (probs * onehot).sum(dims)
        total = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * intersection + self.smooth) / (total + self.smooth)
        if not self.include_background:
            dice = dice[1:]
        return 1.0 - dice.mean()


class CrossEntropyDiceLoss(nn.Module):
    """``ce_weight * cross-entropy + dice_weight * soft Dice``."""

    bioflow_targets = ("classes",)

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        class_weights: Sequence[float] | None = None,
        smooth: float = 1.0,
        include_background: bool = True,
    ) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.ce = CrossEntropyLoss(class_weights)
        self.dice = DiceLoss(smooth, include_background)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce_weight * self.ce(prediction, target) + self.dice_weight * self.dice(prediction, target)
