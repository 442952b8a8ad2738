"""Image restoration: CARE from pairs of degraded and clean images, Noise2Void from noisy images alone.

Both work in the normalised space of their input (the input's own percentiles map to 0 and 1; a
target is normalised with its input's mapping, so the network can learn gains too) and report
PSNR and SSIM after mapping predictions back to the image's intensity units, against the target in
the same units. ``data_range`` (in those units) is given in the task settings, or taken per image
as the target's maximum minus minimum.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Optional, Sequence

import numpy as np
import torch
from torchmetrics import MeanMetric

from bioflow.config import component
from bioflow.errors import ConfigError
from bioflow.inference.outputs import OutputSpec, PredictionSession
from bioflow.registry import registry
from bioflow.tasks.base import BaseTask
from bioflow.tasks.exchange import PackageOutput


def to_units(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Normalised ``(C, *spatial)`` back to image units with ``norm`` = ``(2, C)`` (low, high)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    low, high = norm[0].reshape(shape), norm[1].reshape(shape)
    return x * (high - low).clamp(min=1e-6) + low


class _ImageQuality(torch.nn.Module):
    """Mean PSNR and SSIM over images (each image with its own data range), synced across ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.psnr = MeanMetric()
        self.ssim = MeanMetric()

    def update(self, prediction: torch.Tensor, target: torch.Tensor, data_range: float) -> None:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        p, t = prediction[None].float(), target[None].float()
        self.psnr.update(peak_signal_noise_ratio(p, t, data_range=data_range))
        if min(t.shape[2:]) >= 11:  # SSIM's Gaussian window needs 11 pixels
            self.ssim.update(structural_similarity_index_measure(p, t, data_range=data_range))

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"psnr": self.psnr.compute()}
        if self.ssim.update_count:
            out["ssim"] = self.ssim.compute()
        return out

    def reset(self) -> None:
        self.psnr.reset()
        self.ssim.reset()


class RestorationTask(BaseTask):
    """What CARE and Noise2Void share: image outputs, quality metrics, prediction of float images."""

    headline_metrics: ClassVar[tuple[str, ...]] = ("test/psnr", "test/ssim")
    bioflow_targets: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any], inference: bool = False, *,
                 data_range: Optional[float] = None, monitor: str = "val/loss",
                 monitor_mode: Literal["max", "min"] = "min") -> None:
        super().__init__(config, data_info, inference)
        self.quality = torch.nn.ModuleDict({stage: _ImageQuality() for stage in ("val", "test")})

    def out_channels(self) -> int:
        return self.data_info.in_channels

    def data_range(self, target: torch.Tensor) -> float:
        fixed = self.task_settings["data_range"]
        if fixed is not None:
            return float(fixed)
        return max(float(target.max() - target.min()), 1e-6)

    def update_quality(self, stage: str, output: torch.Tensor, target: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Add one image to the PSNR/SSIM of ``stage``; returns the prediction in image units."""
        prediction, truth = to_units(output, norm), to_units(target, norm)
        self.quality[stage].update(prediction, truth, self.data_range(truth))
        return prediction

    def figure_sample(self, stage: str, batch, image, prediction, target, norm) -> None:
        """The figure's sample in image units, with the PSNR of the prediction and of the input."""
        if not self.wants_figure_sample(stage):
            return
        from torchmetrics.functional.image import peak_signal_noise_ratio

        image, truth = to_units(image, norm), None if target is None else to_units(target, norm)
        scores = {}
        if truth is not None:
            data_range = self.data_range(truth)
            scores = {"PSNR": float(peak_signal_noise_ratio(prediction.float(), truth.float(), data_range=data_range)),
                      "input PSNR": float(peak_signal_noise_ratio(image.float(), truth.float(), data_range=data_range))}
        self.collect_figure_sample(stage, batch, image, truth, prediction, scores)

    def log_metrics(self, stage: str) -> None:
        if self.quality[stage].psnr.update_count:
            self.log_scores(stage, self.quality[stage].compute())
        self.quality[stage].reset()

    # -- prediction ---------------------------------------------------------------------------------
    def prediction_outputs(self) -> list[OutputSpec]:
        return [OutputSpec("restored", self.data_info.in_channels, np.float32)]

    def prediction_session(self, shape, workdir=None) -> PredictionSession:
        return PredictionSession(self.prediction_outputs(), self._restored)

    def predict_array(self, image, sink, **options) -> None:
        """Predict, and hand on strips already mapped back to the image's intensity units."""
        norm = self.normalizer().norm_for(image)
        norm_tensor = torch.from_numpy(np.stack([norm.low, norm.high]))

        def to_image_units(start: int, raw: torch.Tensor) -> None:
            sink(start, to_units(raw, norm_tensor.to(raw.device)))

        super().predict_array(image, to_image_units, norm=norm, **options)

    @staticmethod
    def _restored(raw: torch.Tensor) -> dict[str, np.ndarray]:
        return {"restored": raw.detach().cpu().numpy().astype(np.float32)}

    # -- model exchange ---------------------------------------------------------------------------
    def package_outputs(self) -> list[PackageOutput]:
        channels = [f"channel{i}" for i in range(self.data_info.in_channels)]
        return [PackageOutput("restored", channels, [], "restored image", in_input_units=True)]


class CARETask(RestorationTask):
    """Content-aware restoration (Weigert et al., 2018): learn degraded -> clean from image pairs.

    The network (a U-Net with ``residual: true`` in the demo) predicts the correction of its input.
    Loss: MAE or MSE against the clean target. Validation: loss, PSNR and SSIM.
    """

    target_kind: ClassVar[str] = "image"
    exchange_title: ClassVar[str] = "CARE restoration"
    citations: ClassVar[tuple[dict[str, str], ...]] = (
        {"text": "Weigert et al. Content-aware image restoration: pushing the limits of fluorescence microscopy. "
                 "Nature Methods 2018", "doi": "10.1038/s41592-018-0216-7"},)
    exchange_tags: ClassVar[tuple[str, ...]] = ("restoration", "denoising", "care")
    caveat: ClassVar[str] = (
        "CARE reproduces what its training targets contain, noise included, and it can hallucinate plausible "
        "structures that are not in the sample. It applies only to data like its training data (the same sample "
        "type, microscope and acquisition settings): check results against the raw data before quantifying, and do "
        "not use it for images unlike its training images."
    )

    def evaluate_image(self, stage: str, batch: dict[str, Any]) -> None:
        image, target, norm = batch["image"][0], batch["target"][0], batch["norm"][0]
        output = self.predict_image(image)
        self.mean_loss[stage].update(self.loss_fn(output[None], target[None]))
        prediction = self.update_quality(stage, output, target, norm)
        self.figure_sample(stage, batch, image, prediction, target, norm)


class N2VTask(RestorationTask):
    """Noise2Void (Krull et al., 2019): denoising trained on the noisy images themselves.

    A batch transform (``batch_transform``, by default ``n2v``) replaces a few pixels of every
    training patch on the device; the loss (masked MSE) compares the output with the original
    values at exactly those pixels. Validation reports the same self-supervised loss on masked
    validation images (fixed masks per epoch), and PSNR/SSIM when the data provide clean images.
    """

    target_kind: ClassVar[str] = "optional_image"
    bioflow_targets: ClassVar[tuple[str, ...]] = ("masked_image",)
    uses: ClassVar[tuple[str, ...]] = ("batch_transform",)
    exchange_title: ClassVar[str] = "Noise2Void denoising"
    citations: ClassVar[tuple[dict[str, str], ...]] = (
        {"text": "Krull, Buchholz and Jug. Noise2Void - Learning Denoising From Single Noisy Images. CVPR 2019",
         "doi": "10.1109/CVPR.2019.00223"},)
    exchange_tags: ClassVar[tuple[str, ...]] = ("denoising", "n2v", "self-supervised")
    caveat: ClassVar[str] = (
        "Noise2Void removes only noise that is independent from pixel to pixel: structured or correlated noise "
        "(stripes, scan lines, camera patterns) stays and can leave artefacts (try structN2V). The blind-spot "
        "training smooths fine detail of one pixel's size."
    )

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any], inference: bool = False, *,
                 data_range: Optional[float] = None, monitor: str = "val/loss",
                 monitor_mode: Literal["max", "min"] = "min") -> None:
        super().__init__(config, data_info, inference, data_range=data_range, monitor=monitor, monitor_mode=monitor_mode)
        node = self.context.batch_transform
        if node is None:
            raise ConfigError("batch_transform: Noise2Void needs a blind-spot batch transform, e.g. batch_transform=n2v")
        name, kwargs = component(node)
        self.masking = None if inference else registry.create("batch_transforms", name, where="batch_transform", **kwargs)
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, kind: str) -> torch.Generator:
        """Per-rank, per-device random streams: ranks mask differently, runs repeat exactly."""
        if kind not in self._generators or self._generators[kind].device != self.device:
            g = torch.Generator(device=self.device)
            offset = {"train": 0, "val": 1_000_003}[kind]
            g.manual_seed(self.context.seed * 7919 + self.global_rank * 104729 + offset)
            self._generators[kind] = g
        return self._generators[kind]

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._generators.pop("val", None)  # the same validation masks every epoch

    def training_pair(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The blind-spot masked patches, and the original values with the mask as the target."""
        image = batch["image"]
        masked, mask = self.masking(image, generator=self._generator("train"))
        return masked, torch.cat([image, mask.to(image.dtype)], dim=1)

    def evaluate_image(self, stage: str, batch: dict[str, Any]) -> None:
        image, norm = batch["image"][0], batch["norm"][0]
        masked, mask = self.masking(image[None], generator=self._generator("val"))
        blind = self.predict_image(masked[0])
        self.mean_loss[stage].update(self.loss_fn(blind[None], torch.cat([image[None], mask.to(image.dtype)], dim=1)))
        if "target" not in batch:  # no clean image: the figure shows input and prediction only
            if self.wants_figure_sample(stage):
                self.figure_sample(stage, batch, image, to_units(self.predict_image(image), norm), None, norm)
            return
        output = self.predict_image(image)
        prediction = self.update_quality(stage, output, batch["target"][0], norm)
        self.figure_sample(stage, batch, image, prediction, batch["target"][0], norm)
