"""Semantic segmentation: a class for every pixel (e.g. nucleus versus background)."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar, Literal, Mapping, Optional

import numpy as np
import torch

from bioflow.config import component
from bioflow.errors import ConfigError, DataError
from bioflow.inference.outputs import OutputSpec, PredictionSession, SpooledArray
from bioflow.conventions import IGNORE_INDEX
from bioflow.metrics.segmentation import SegmentationScores
from bioflow.registry import registry
from bioflow.tasks.base import BaseTask
from bioflow.tasks.exchange import PackageOutput


#: More classes than this counted from the masks are taken for instance labels, not class indices.
MAX_COUNTED_CLASSES = 32


def labels_to_classes(target: np.ndarray, mode: str, num_classes: int) -> np.ndarray:
    """Class indices from a mask: ``binary`` (any label > 0 is class 1) or ``classes`` (as is).

    Padding (``IGNORE_INDEX``) stays. Values outside ``0..num_classes-1`` in ``classes`` mode are an
    error: they would silently train a wrong class (:func:`mask_classes` finds them before training).
    """
    target = np.asarray(target)
    if mode == "binary":
        return np.where(target == IGNORE_INDEX, IGNORE_INDEX, (target > 0).astype(np.int64))
    bad = (target != IGNORE_INDEX) & ((target < 0) | (target >= num_classes))
    if bad.any():
        raise DataError(
            f"mask value {int(target[bad][0])} is not a class index 0..{num_classes - 1} "
            "(set task.num_classes, or task.target=binary for instance labels)"
        )
    return target.astype(np.int64)


def mask_classes(records, most: int | None = MAX_COUNTED_CLASSES) -> tuple[int, str | None]:
    """The number of classes the masks of ``records`` hold as class indices (their largest value + 1),
    and the file that holds the largest value.

    A negative value, or more classes than ``most`` (instance labels, or 0/255 masks; None: no
    limit), is a :class:`DataError` naming the file and the setting to use.
    """
    from bioflow.data.records import blocks

    largest, where = 0, None
    for r in records:
        if r.target is None:
            continue
        for block in blocks(r.target):
            if block.size == 0:
                continue
            low, high = int(block.min()), int(block.max())
            where_r = r.meta.get("target_source") or r.source or r.name
            if low < 0:
                raise DataError(f"{where_r}: mask value {low} is not a class index (task.target=classes "
                                "takes the values 0, 1, 2, ... as classes)")
            if high > largest:
                largest, where = high, where_r
    if most is not None and largest + 1 > most:
        raise DataError(f"{where}: value {largest} is no class index; for instance labels or 0/255 masks use "
                        "task.target=binary")
    return largest + 1, where


def default_class_names(num_classes: int) -> list[str]:
    """``background`` for class 0, ``foreground`` (two classes) or ``class1``, ``class2``, ... for the others."""
    return ["background", "foreground"] if num_classes == 2 else ["background"] + [f"class{k}" for k in range(1, num_classes)]


def class_settings(target: str, num_classes: Optional[int], class_names) -> tuple[int, list[str]]:
    """The number of classes and their names from the settings (a :class:`ConfigError` if they disagree)."""
    if num_classes is None:
        if target == "classes":
            raise ConfigError("task.num_classes: not set; training counts the classes from the masks, a task built "
                              "otherwise needs it")
        num_classes = 2
    if target == "binary" and num_classes != 2:
        raise ConfigError(f"task.num_classes: binary targets have exactly 2 classes, not {num_classes} (mask values as "
                          "class indices need task.target=classes)")
    if int(num_classes) < 2:
        raise ConfigError(f"task.num_classes: {num_classes}; segmentation needs at least 2 classes (background and one)")
    names = default_class_names(int(num_classes)) if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ConfigError(f"task.class_names: {len(names)} names for {num_classes} classes; give {num_classes} names, or "
                          f"task.class_names=null for {', '.join(default_class_names(int(num_classes)))}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"task.class_names: {', '.join(repeated)} named twice; each class needs its own name (its "
                          "metrics are named by it)")
    return int(num_classes), names


class SegmentationTask(BaseTask):
    """Semantic segmentation (U-Net style): a class for every pixel, Dice and IoU per class.

    Settings: ``target`` (``binary``: every label > 0 is foreground; ``classes``: mask values are
    class indices), ``num_classes`` (unset: 2 for binary targets, counted from the masks for
    classes), ``class_names`` (unset: ``background`` and ``foreground`` or ``class1``, ...),
    ``monitor`` and ``monitor_mode`` (the validation score that picks the best checkpoint). A
    ``postprocessor`` (e.g. ``connected_components``) turns the class map into instances at
    prediction time.
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
                 target: Literal["binary", "classes"] = "binary", num_classes: Optional[int] = None,
                 class_names: Optional[list[str]] = None, monitor: str = "val/dice_fg_mean",
                 monitor_mode: Literal["max", "min"] = "max") -> None:
        self.num_classes, self.class_names = class_settings(target, num_classes, class_names)
        super().__init__(config, data_info, inference)
        self.postprocessor = self.build_postprocessor()
        self.metrics = torch.nn.ModuleDict(
            {stage: SegmentationScores(self.num_classes, self.class_names) for stage in ("val", "test")}
        )

    @classmethod
    def settings_from_data(cls, settings: Mapping[str, Any], records) -> dict[str, Any]:
        """The number of classes and their names where unset; given numbers checked against the masks."""
        if settings.get("num_classes") is not None:  # the settings' own errors first
            class_settings(settings.get("target", "binary"), settings["num_classes"], settings.get("class_names"))
        if settings.get("target") != "classes":
            found = {} if settings.get("num_classes") is not None else {"num_classes": 2}
        else:
            given = settings.get("num_classes")
            counted, where = mask_classes(records, None if given is not None else MAX_COUNTED_CLASSES)
            if given is not None and counted > given:
                raise DataError(f"{where}: mask value {counted - 1} is not a class index 0..{given - 1} "
                                f"(task.num_classes={given}); set task.num_classes={counted}, or leave it unset")
            found = {} if given is not None else {"num_classes": counted}
        num_classes = found.get("num_classes", settings.get("num_classes"))
        if settings.get("class_names") is None:
            found["class_names"] = default_class_names(int(num_classes))
        class_settings(settings.get("target", "binary"), num_classes, found.get("class_names", settings.get("class_names")))
        return found

    @classmethod
    def target_transform(cls, settings: Mapping[str, Any]):
        return partial(labels_to_classes, mode=settings["target"], num_classes=settings["num_classes"])

    def out_channels(self) -> int:
        return self.num_classes

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

    #: ``bioflow predict --confidence``: a per-pixel confidence map (the probability of the chosen class).
    gives_confidence: ClassVar[bool] = True

    def spread_quantity(self, raw: torch.Tensor) -> torch.Tensor:
        """``--tta-spread`` measures how the class probabilities vary."""
        return raw.float().softmax(dim=1)

    def prediction_outputs(self) -> list[OutputSpec]:
        classes = self.out_channels()
        outputs = [OutputSpec("labels", None, np.uint8 if classes <= 256 else np.uint16)]
        if self.context.predict.get("confidence"):
            outputs.append(OutputSpec("confidence", None, np.float32))
        if self.postprocessor is not None:
            outputs.append(OutputSpec("instances", None, np.int32, streamed=False))
        return outputs

    def prediction_session(self, shape, workdir=None) -> PredictionSession:
        return _SegmentationSession(self, shape, workdir)

    def package_outputs(self) -> list[PackageOutput]:
        return [PackageOutput("probabilities", [str(c) for c in self.class_names], [{"id": "softmax", "kwargs": {"axis": "channel"}}],
                              "class probabilities (softmax); the class map is their argmax")]


class _SegmentationSession(PredictionSession):
    """Class maps strip by strip; with a post-processor, class probabilities are kept on disk for it."""

    def __init__(self, task: SegmentationTask, shape, workdir) -> None:
        super().__init__(task.prediction_outputs(), self._labels)
        self.task = task
        self.dtype = self.outputs[0].dtype
        self.confidence = any(o.name == "confidence" for o in self.outputs)
        self.spool = SpooledArray((task.out_channels(), *shape), workdir) if task.postprocessor is not None else None

    def _labels(self, raw: torch.Tensor) -> dict[str, np.ndarray]:
        out = {"labels": raw.argmax(dim=0).cpu().numpy().astype(self.dtype)}
        if self.confidence:  # the softmax probability of the class chosen at each pixel
            out["confidence"] = raw.float().softmax(dim=0).amax(dim=0).cpu().numpy()
        return out

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
