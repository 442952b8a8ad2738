"""An image-level task: does a field of view hold any nucleus? (quality control of screens).

What is special about this method, and only that: the network (any registered model) draws a map
of evidence for "occupied" and "empty"; its maximum over the image is the image's logit, trained
with the cross-entropy against the truth read from the masks (a field is occupied when its mask
holds at least ``min_pixels`` labelled pixels). ``bioflow predict`` writes the evidence map (the
probability of "occupied" per pixel), whose maximum is the field's score.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torchmetrics import MeanMetric

from bioflow.inference.outputs import OutputSpec, PredictionSession
from bioflow.tasks.base import BaseTask


class FieldClassifierTask(BaseTask):
    """Empty or occupied field of view, from label masks (class 0 empty, class 1 occupied).

    Settings: ``min_pixels`` (labelled pixels that make a field occupied), ``monitor``,
    ``monitor_mode``.
    """

    target_kind: ClassVar[str] = "mask"
    headline_metrics: ClassVar[tuple[str, ...]] = ("test/accuracy",)

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any], inference: bool = False, *,
                 min_pixels: int = 20, monitor: str = "val/accuracy", monitor_mode: Literal["max", "min"] = "max") -> None:
        super().__init__(config, data_info, inference)
        self.accuracy = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    def out_channels(self) -> int:
        return 2

    def occupied(self, labels: torch.Tensor) -> torch.Tensor:
        """Class per field: 1 where a label image (or batch of them) has at least ``min_pixels`` objects' pixels."""
        counted = (labels > 0).flatten(start_dim=labels.dim() - self.data_info.spatial_dims).sum(dim=-1)
        return (counted >= int(self.task_settings["min_pixels"])).long()

    @staticmethod
    def field_logits(maps: torch.Tensor) -> torch.Tensor:
        """(N, 2, *spatial) evidence maps -> (N, 2) field logits: the strongest evidence of each class."""
        return maps.flatten(start_dim=2).amax(dim=2)

    def training_pair(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["image"], self.occupied(batch["target"])

    def loss_input(self, output: torch.Tensor) -> torch.Tensor:
        return self.field_logits(output)

    def evaluate_image(self, stage: str, batch: dict[str, Any]) -> None:
        image, labels = batch["image"][0], batch["target"][0]
        logits = self.field_logits(self.predict_image(image)[None])
        truth = self.occupied(labels)[None]
        self.mean_loss[stage].update(self.loss_fn(logits, truth))
        self.accuracy[stage].update((logits.argmax(dim=1) == truth).float())

    def log_metrics(self, stage: str) -> None:
        if self.accuracy[stage].update_count:
            self.log_scores(stage, {"accuracy": self.accuracy[stage].compute()})
        self.accuracy[stage].reset()

    def prediction_outputs(self) -> list[OutputSpec]:
        return [OutputSpec("evidence", None, np.float32)]

    def prediction_session(self, shape, workdir=None) -> PredictionSession:
        return PredictionSession(self.prediction_outputs(),
                                 lambda raw: {"evidence": raw.softmax(dim=0)[1].cpu().numpy().astype(np.float32)})
