"""The Tversky loss (Salehi et al., 2017): a Dice loss that weighs false positives and negatives apart."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -1  # bioflow marks padding in segmentation targets with -1


class TverskyLoss(nn.Module):
    """``1 - mean_k TP_k / (TP_k + alpha FP_k + beta FN_k)`` with soft (softmax) counts.

    ``alpha = beta = 0.5`` is the Dice loss; ``beta > alpha`` penalises missed foreground more,
    which helps small or rare structures.

    Parameters
    ----------
    alpha, beta
        Weights of false positives and false negatives.
    smooth
        Added to numerator and denominator.
    include_background
        Whether class 0 takes part in the mean.
    """

    def __init__(self, alpha: float = 0.3, beta: float = 0.7, smooth: float = 1.0, include_background: bool = False) -> None:
        super().__init__()
        self.alpha, self.beta, self.smooth = alpha, beta, smooth
        self.include_background = include_background

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = (target != IGNORE_INDEX).unsqueeze(1).to(prediction.dtype)
        probs = prediction.softmax(dim=1) * valid
        onehot = F.one_hot(target.long().clamp(min=0), prediction.shape[1]).movedim(-1, 1).to(prediction.dtype) * valid
        dims = (0, *range(2, prediction.ndim))
        tp = (probs * onehot).sum(dims)
        fp = (probs * (1 - onehot)).sum(dims)
        fn = ((1 - probs) * onehot).sum(dims)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        if not self.include_background:
            index = index[1:]
        return 1.0 - index.mean()
