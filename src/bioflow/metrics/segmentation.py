"""Pixel-wise segmentation scores per class from one confusion matrix, synced across ranks.

For class ``k`` with true positives TP, false positives FP and false negatives FN counted over
every pixel of the evaluated images (pooled, not averaged per image):

- Dice (F1) = 2 TP / (2 TP + FP + FN)
- IoU (Jaccard) = TP / (TP + FP + FN)

A class absent from both targets and predictions has an undefined score (NaN); means over classes
skip undefined scores. Pixels labelled ``ignore_index`` do not count.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from bioflow.conventions import IGNORE_INDEX


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class Dice and IoU from a confusion matrix (rows: truth, columns: prediction)."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    undefined = (tp + fp + fn) == 0
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=confusion.device)
    dice = torch.where(undefined, nan, 2 * tp / (2 * tp + fp + fn).clamp(min=1))
    iou = torch.where(undefined, nan, tp / (tp + fp + fn).clamp(min=1))
    return {"dice": dice, "iou": iou}


class SegmentationScores(MulticlassConfusionMatrix):
    """Dice and IoU per class, their mean, and their mean over foreground classes (1..K-1).

    ``update(predicted_classes, target_classes)`` takes integer class maps of equal shape.
    ``compute()`` returns a flat dict such as ``{"dice_nucleus": ..., "dice_mean": ...,
    "dice_fg_mean": ..., "iou_nucleus": ...}``.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        super().__init__(num_classes=num_classes, ignore_index=IGNORE_INDEX, validate_args=False)
        names = list(class_names) if class_names is not None else [f"class{k}" for k in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} classes")
        self.class_names = names

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        out: dict[str, torch.Tensor] = {}
        for metric, values in scores_from_confusion(super().compute()).items():
            for name, v in zip(self.class_names, values):
                out[f"{metric}_{name}"] = v
            out[f"{metric}_mean"] = values.nanmean()
            if len(values) > 1:
                out[f"{metric}_fg_mean"] = values[1:].nanmean()
        return out
