"""Semantic segmentation: a class for every pixel (e.g. nucleus versus background)."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Literal, Mapping, Optional

import numpy as np
import torch

from bioflow.config import component
from bioflow.errors import ConfigError
from bioflow.inference.outputs import OutputSpec, PredictionSession, SpooledArray
from bioflow.conventions import IGNORE_INDEX
from bioflow.metrics.segmentation import SegmentationScores
from bioflow.registry import registry
from bioflow.tasks.base import BaseTask
from bioflow.tasks.exchange import PackageOutput


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
    """Semantic segmentation (U-Net style): a class for every pixel, Dice and IoU per class.

    Settings: ``target`` (``binary``: every label > 0 is foreground; ``classes``: mask values are
    class indices), ``num_classes``, ``class_names``, ``monitor`` and ``monitor_mode`` (the
    validation score that picks the best checkpoint). A ``postprocessor`` (e.g.
    ``connected_components``) turns the class map into instances at prediction time.
    """

    target_kind: ClassVar[str] = "mask"
    uses: ClassVar[tuple[str, ...]] = ("postprocessor",)
    headline_metrics: ClassVar[tuple[str, ...]] = ("test/dice_fg_mean", "test/iou_fg_mean")
    exchange_title: ClassVar[str] = "U-Net segmentation"
    citations: ClassVar[tuple[dict[str, str], ...]] = (
        {"text": "Ronneberger, Fischer and Brox. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
                 "MICCAI 2015", "doi": "10.1007/978-3-319-24574-4_28"},)
    exchange_tags: ClassVar[tuple[str, ...]] = ("semantic-segmentation", "unet")
    caveat: ClassVar[str] = ("The class probabilities are only as good as the training masks; check them on images of "
                             "your own acquisition setting before quantifying.")

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any], inference: bool = False, *,
                 target: Literal["binary", "classes"] = "binary", num_classes: int = 2,
                 class_names: Optional[list[str]] = None, monitor: str = "val/dice_fg_mean",
                 monitor_mode: Literal["max", "min"] = "max") -> None:
        if target == "binary" and num_classes != 2:
            raise ConfigError("task.num_classes: binary targets have exactly 2 classes")
        super().__init__(config, data_info, inference)
        self.postprocessor = self.build_postprocessor()
        self.metrics = torch.nn.ModuleDict(
            {stage: SegmentationScores(num_classes, class_names) for stage in ("val", "test")}
        )

    @classmethod
    def target_transform(cls, settings: Mapping[str, Any]):
        return partial(labels_to_classes, mode=settings["target"], num_classes=settings["num_classes"])

    def out_channels(self) -> int:
        return int(self.task_settings["num_classes"])

    def build_postprocessor(self):
        """The configured post-processor (``postprocessor`` section), or None."""
        node = self.context.postprocessor
        if node is None:
            return None
        name, kwargs = component(node)
        return registry.create("postprocessors", name, where="postprocessor", **kwargs)

    def decode(self, output: torch.Tensor) -> torch.Tensor:
        return output.argmax(dim=0)

    def evaluate_image(self, stage: str, batch: dict[str, Any]) -> None:
        image, target = batch["image"][0], batch["target"][0]
        output = self.predict_image(image)
        self.mean_loss[stage].update(self.loss_fn(output[None], self.loss_target(target[None])))
        prediction = self.decode(output)
        self.metrics[stage].update(prediction[None], target[None])
        if self.wants_figure_sample(stage):
            self.collect_figure_sample(stage, batch, image, target, prediction, self.image_scores(prediction, target))

    def log_metrics(self, stage: str) -> None:
        self.log_scores(stage, self.metrics[stage].compute())
        self.metrics[stage].reset()

    @staticmethod
    def image_scores(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Dice of the foreground (all classes but background) of one image."""
        valid = target != IGNORE_INDEX
        pred, true = (prediction > 0) & valid, (target > 0) & valid
        total = int(pred.sum() + true.sum())
        return {"Dice": 2.0 * int((pred & true).sum()) / total if total else 1.0}

    def prediction_outputs(self) -> list[OutputSpec]:
        classes = self.out_channels()
        outputs = [OutputSpec("labels", None, np.uint8 if classes <= 256 else np.uint16)]
        if self.postprocessor is not None:
            outputs.append(OutputSpec("instances", None, np.int32, streamed=False))
        return outputs

    def prediction_session(self, shape, workdir=None) -> PredictionSession:
        return _SegmentationSession(self, shape, workdir)

    def package_outputs(self) -> list[PackageOutput]:
        names = self.task_settings["class_names"] or [f"class{i}" for i in range(self.out_channels())]
        return [PackageOutput("probabilities", [str(c) for c in names], [{"id": "softmax", "kwargs": {"axis": "channel"}}],
                              "class probabilities (softmax); the class map is their argmax")]


class _SegmentationSession(PredictionSession):
    """Class maps strip by strip; with a post-processor, class probabilities are kept on disk for it."""

    def __init__(self, task: SegmentationTask, shape, workdir) -> None:
        super().__init__(task.prediction_outputs(), self._labels)
        self.task = task
        self.dtype = self.outputs[0].dtype
        self.spool = SpooledArray((task.out_channels(), *shape), workdir) if task.postprocessor is not None else None

    def _labels(self, raw: torch.Tensor) -> dict[str, np.ndarray]:
        return {"labels": raw.argmax(dim=0).cpu().numpy().astype(self.dtype)}

    def block(self, start: int, raw: torch.Tensor) -> dict[str, np.ndarray]:
        if self.spool is not None:
            self.spool.write([0, start] + [0] * (raw.ndim - 2), raw.softmax(dim=0).cpu().numpy())
        return self._labels(raw)

    def finish(self) -> dict[str, np.ndarray]:
        if self.spool is None:
            return {}
        return {"instances": np.asarray(self.task.postprocessor(self.spool.array()), dtype=np.int32)}

    def close(self) -> None:
        if self.spool is not None:
            self.spool.remove()
