"""Semantic segmentation: a class for every pixel (e.g. nucleus versus background)."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from bioflow.errors import ConfigError
from bioflow.losses.segmentation import IGNORE_INDEX
from bioflow.metrics.segmentation import SegmentationScores
from bioflow.tasks.base import BaseTask


def labels_to_classes(target: np.ndarray, mode: str, num_classes: int) -> np.ndarray:
    """Class indices from a mask: ``binary`` (any label > 0 is class 1) or ``classes`` (as is).

    Padding (``IGNORE_INDEX``) stays. Values outside ``0..num_classes-1`` in ``classes`` mode are an
    error: they would silently train a wrong class.
    """
    target = np.asarray(target)
    if mode == "binary":
        return np.where(target == IGNORE_INDEX, IGNORE_INDEX, (target > 0).astype(np.int64))
    bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= num_classes))
    if bad.any():
        raise ValueError(
            f"mask value {int(target[bad][0])} is not a class index 0..{num_classes - 1} "
            "(set task.num_classes, or task.target=binary for instance labels)"
        )
    return target.astype(np.int64)


class SegmentationTask(BaseTask):
    """U-Net-style semantic segmentation with Dice and IoU per class.

    Settings (``task`` section): ``target`` (``binary`` or ``classes``), ``num_classes``,
    ``class_names``, ``monitor`` and ``monitor_mode`` (the validation score that picks the best
    checkpoint).
    """

    target_kind: ClassVar[str] = "mask"
    settings: ClassVar[dict[str, Any]] = {
        "target": "binary",
        "num_classes": 2,
        "class_names": None,
        "monitor": "val/dice_fg_mean",
        "monitor_mode": "max",
    }

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any]) -> None:
        super().__init__(config, data_info)
        settings = self.task_settings
        if settings["target"] == "binary" and settings["num_classes"] != 2:
            raise ConfigError("task.num_classes: binary targets have exactly 2 classes")
        names = settings["class_names"]
        self.metrics = torch.nn.ModuleDict(
            {stage: SegmentationScores(settings["num_classes"], names) for stage in ("val", "test")}
        )

    @classmethod
    def target_transform(cls, settings: Mapping[str, Any]):
        return partial(labels_to_classes, mode=settings["target"], num_classes=settings["num_classes"])

    def out_channels(self) -> int:
        return int(self.task_settings["num_classes"])

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=0)

    def prediction_outputs(self) -> list:
        from bioflow.predict import OutputSpec

        classes = self.out_channels()
        return [OutputSpec("labels", None, np.uint8 if classes <= 256 else np.uint16)]

    def finalize_block(self, raw: torch.Tensor) -> dict[str, np.ndarray]:
        dtype = self.prediction_outputs()[0].dtype
        return {"labels": raw.argmax(dim=0).cpu().numpy().astype(dtype)}

    def update_metrics(self, stage: str, prediction: torch.Tensor, target: torch.Tensor) -> None:
        self.metrics[stage].update(prediction[None], target[None])

    def log_metrics(self, stage: str) -> None:
        self.log_scores(stage, self.metrics[stage].compute())
        self.metrics[stage].reset()
