"""Image restoration: CARE from pairs of degraded and clean images, Noise2Void from noisy images alone.

Both work in the normalised space of their input (the input's own percentiles map to 0 and 1; a
target is normalised with its input's mapping, so the network can learn gains too) and report
PSNR and SSIM after mapping predictions back to the image's intensity units, against the target in
the same units. ``data_range`` (in those units) is given in the task settings, or taken per image
as the target's maximum minus minimum.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal, Optional

import numpy as np
import torch
from torchmetrics import MeanMetric

from bioflow.config import component
from bioflow.errors import ConfigError
from bioflow.losses.likelihood import DISTRIBUTIONS, split
from bioflow.metrics.calibration import calibration, fit_knots, identity_knots, recalibrate
from bioflow.inference.outputs import OutputSpec, PredictionSession
from bioflow.registry import registry
from bioflow.tasks.base import BaseTask
from bioflow.tasks.context import TaskContext
from bioflow.tasks.exchange import PackageOutput

log = logging.getLogger(__name__)


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


def likelihood_of(loss_node, probabilistic: bool) -> tuple[Any, Optional[str]]:
    """The distribution a probabilistic restoration predicts, and the loss to train it with (None:
    the configured one), from the ``loss`` section.

    A likelihood loss (``laplace_nll``, ``gaussian_nll``, ``masked_gaussian_nll``) is used as it
    is; a point loss with a likelihood form (``mae``: Laplace, ``mse`` and ``masked_mse``: Gaussian)
    is replaced by it, which keeps what the location estimates (median, mean).
    """
    name, _ = component(loss_node)
    loss_cls = registry.load("losses", name)
    distribution = getattr(loss_cls, "bioflow_distribution", None)
    if not probabilistic:
        if distribution is not None:
            raise ConfigError(f"loss={name}: a likelihood loss needs a probabilistic model; set task.probabilistic=true")
        return None, None
    if distribution is not None:
        return DISTRIBUTIONS[distribution], None
    counterpart = getattr(loss_cls, "bioflow_probabilistic", None)
    if counterpart is None:
        raise ConfigError(f"task.probabilistic: loss '{name}' has no likelihood form; use loss=laplace_nll or "
                          "loss=gaussian_nll (masked_gaussian_nll for Noise2Void)")
    return DISTRIBUTIONS[registry.load("losses", counterpart).bioflow_distribution], counterpart


class RestorationTask(BaseTask):
    """What CARE and Noise2Void share: image outputs, quality metrics, prediction of float images."""

    headline_metrics: ClassVar[tuple[str, ...]] = ("test/psnr", "test/ssim")
    bioflow_targets: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any], inference: bool = False, *,
                 data_range: Optional[float] = None, probabilistic: bool = False, monitor: str = "val/loss",
                 monitor_mode: Literal["max", "min"] = "min") -> None:
        # before the network is built: a probabilistic one has twice the outputs
        self.distribution, self._likelihood_loss = likelihood_of(TaskContext.from_config(config).loss, probabilistic)
        super().__init__(config, data_info, inference)
        self.quality = torch.nn.ModuleDict({stage: _ImageQuality() for stage in ("val", "test")})
        if self.distribution is not None:
            #: Recalibration of the predicted std (metrics.calibration), fitted on validation after training.
            self.register_buffer("calibration_knots", identity_knots())
        self._calibration_samples: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"val": [], "test": []}
        self.calibration_tables: dict[str, Any] = {}

    def out_channels(self) -> int:
        return self.data_info.in_channels * (2 if self.distribution is not None else 1)

    def build_loss(self) -> torch.nn.Module:
        if self._likelihood_loss is None:
            return super().build_loss()
        return registry.create("losses", self._likelihood_loss, where="loss")

    # -- probabilistic outputs: location, and the std of the predicted distribution -------------------
    def location(self, output: torch.Tensor) -> torch.Tensor:
        """The restored image (normalised units) of one raw output ``(C or 2C, ...)``."""
        return output[: self.data_info.in_channels]

    #: True for a model read from its bioimage.io package, whose network gives the calibrated std itself.
    packaged_std = False

    def raw_std(self, output: torch.Tensor) -> torch.Tensor:
        """The predicted standard deviation (normalised units) before recalibration (a package's
        network gives it recalibrated already: its recalibration is then the identity)."""
        if self.packaged_std:
            return output[self.data_info.in_channels:]
        _, scale = split(output[None])
        return self.distribution.std(scale[0])

    #: The image's normalisation span per channel while it is predicted (for the TTA spread's units).
    _spread_span: torch.Tensor | None = None

    def spread_quantity(self, raw: torch.Tensor) -> torch.Tensor:
        """``--tta-spread`` measures how the restored image (not the predicted scale) varies, in the
        image's intensity units channel by channel."""
        location = raw[:, : self.data_info.in_channels]
        if self._spread_span is None:
            return location
        return location * self._spread_span.to(location).reshape((1, -1) + (1,) * (location.ndim - 2))

    def uncertainty(self, output: torch.Tensor) -> torch.Tensor:
        """The recalibrated standard deviation (normalised units) of one raw output."""
        if self.packaged_std:
            return output[self.data_info.in_channels:]
        return recalibrate(self.raw_std(output), self.calibration_knots)

    def calibration_pairs(self, batch: dict[str, Any], output: torch.Tensor | None = None):
        """Predicted std before recalibration and the error made, at the pixels where the truth is
        known (normalised units, flat); None without a truth."""
        raise NotImplementedError

    def collect_calibration(self, stage: str, std: torch.Tensor, error: torch.Tensor, most: int = 50_000) -> None:
        """Keep (at most ``most`` seeded random) pixels of one image for the calibration of ``stage``."""
        std, error = std.reshape(-1).float().cpu(), error.reshape(-1).float().cpu()
        if std.numel() > most:
            g = torch.Generator().manual_seed(len(self._calibration_samples[stage]))
            keep = torch.randperm(std.numel(), generator=g)[:most]
            std, error = std[keep], error[keep]
        self._calibration_samples[stage].append((std, error))

    def _pooled(self, stage: str):
        samples = self._calibration_samples[stage]
        self._calibration_samples[stage] = []
        if not samples:
            return None
        return torch.cat([s for s, _ in samples]).numpy(), torch.cat([e for _, e in samples]).numpy()

    def log_calibration(self, stage: str) -> None:
        """Calibration of the (recalibrated) std on ``stage``: summary, and how errors grow with it."""
        pooled = self._pooled(stage)
        if pooled is None or pooled[0].size < 100:
            return
        std, error = pooled
        measured = calibration(std, error)
        self.calibration_tables[stage] = measured
        top = std >= np.quantile(std, 0.95)
        rest_error = float(np.abs(error[~top]).mean()) if (~top).any() else float("nan")
        scores = {**measured.summary(""), "uncertainty_top5_error_ratio": float(np.abs(error[top]).mean()) / max(rest_error, 1e-12)}
        self.log_scores(stage, scores)

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
        if self.distribution is not None:
            self.log_calibration(stage)

    # -- after training: recalibration on the validation split ------------------------------------------
    def after_fit(self, data) -> dict[str, float]:
        """Fit the recalibration of the predicted std on the validation split (probabilistic models)."""
        if self.distribution is None or not data.splits["val"]:
            return {}
        self.eval()
        self.calibration_knots.copy_(identity_knots())
        with torch.no_grad():
            for batch in data.val_dataloader_all():
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                pairs = self.calibration_pairs(batch)
                if pairs is not None:
                    self.collect_calibration("val", *pairs)
        pooled = self._pooled("val")
        if pooled is None or pooled[0].size < 100:
            return {}
        std, error = pooled
        before = calibration(std, error)
        self.calibration_knots.copy_(fit_knots(before))
        after = calibration(recalibrate(torch.from_numpy(std), self.calibration_knots).numpy(), error)
        self.calibration_tables.update(val_before=before, val_after=after)
        return {"calibration_before": before.mean_abs_log_ratio, "calibration_after": after.mean_abs_log_ratio}

    def report_figures(self, metrics, folder) -> list:
        """The calibration plot (observed RMSE against predicted std per bin) and its tables."""
        from bioflow.metrics.calibration import write_calibration_report

        if not self.calibration_tables:
            return []
        return write_calibration_report(self.calibration_tables, self.distribution.name, folder)

    # -- prediction ---------------------------------------------------------------------------------
    def uncertainty_names(self) -> list[str]:
        """The per-pixel std outputs of a probabilistic model, after the restored image."""
        return ["uncertainty"] if self.distribution is not None else []

    def uncertainty_images(self, raw: torch.Tensor, norm: torch.Tensor) -> list[torch.Tensor]:
        """Those outputs of one raw output ``(2C, ...)`` in the image's units (``norm``: low, high)."""
        span = (norm[1] - norm[0]).clamp(min=1e-6).reshape((-1,) + (1,) * (raw.ndim - 1))
        return [self.uncertainty(raw) * span]

    def prediction_outputs(self) -> list[OutputSpec]:
        outputs = [OutputSpec("restored", self.data_info.in_channels, np.float32)]
        for name in self.uncertainty_names():  # the std of each pixel, in the image's intensity units
            outputs.append(OutputSpec(name, self.data_info.in_channels, np.float32))
        return outputs

    def prediction_session(self, shape, workdir=None) -> PredictionSession:
        return PredictionSession(self.prediction_outputs(), self._restored)

    def predict_array(self, image, sink, **options) -> None:
        """Predict, and hand on strips already mapped back to the image's intensity units (the
        restored image, then, for a probabilistic model, its recalibrated std). ``norm``: as for
        any predictor, the normalisation to use instead of the image's own."""
        norm = options.pop("norm", None) or self.normalizer().norm_for(image)
        norm_tensor = torch.from_numpy(np.stack([norm.low, norm.high]))

        spread = bool(options.get("tta_spread"))

        def to_image_units(start: int, raw: torch.Tensor) -> None:
            norm_here = norm_tensor.to(raw.device)
            extra = [raw[-1:]] if spread else []  # the TTA spread, last (in image units: spread_quantity)
            raw = raw[:-1] if spread else raw
            restored = to_units(self.location(raw), norm_here)
            if self.distribution is None:
                sink(start, torch.cat([restored, *extra]))
                return
            sink(start, torch.cat([restored, *self.uncertainty_images(raw, norm_here), *extra]))

        self._spread_span = (norm_tensor[1] - norm_tensor[0]).clamp(min=1e-6)
        try:
            super().predict_array(image, to_image_units, norm=norm, **options)
        finally:
            self._spread_span = None

    def _restored(self, raw: torch.Tensor) -> dict[str, np.ndarray]:
        channels = self.data_info.in_channels
        names = ["restored", *self.uncertainty_names()]
        return {name: raw[i * channels:(i + 1) * channels].detach().cpu().numpy().astype(np.float32)
                for i, name in enumerate(names)}

    # -- model exchange ---------------------------------------------------------------------------
    def package_outputs(self) -> list[PackageOutput]:
        channels = [f"channel{i}" for i in range(self.data_info.in_channels)]
        outputs = [PackageOutput("restored", channels, [], "restored image", in_input_units=True)]
        if self.distribution is not None:  # the network of the package computes the calibrated std
            outputs.append(PackageOutput("uncertainty", channels, [], f"per-pixel standard deviation ({self.distribution.name}, "
                                         "recalibrated on validation)", in_input_scale=True))
        return outputs

    def package_network(self) -> torch.nn.Module:
        """A probabilistic model's network returns location and calibrated std (models.probabilistic)."""
        if self.distribution is None:
            return self.model
        from bioflow.losses.likelihood import LOG_RANGE, LOG_START, MIN_SCALE
        from bioflow.models.probabilistic import WithStd

        wrapped = WithStd(self.model, self.data_info.in_channels, self.distribution.std_per_scale, LOG_RANGE, LOG_START,
                          MIN_SCALE, self.calibration_knots.shape[1])
        wrapped.knots.copy_(self.calibration_knots)
        return wrapped

    def load_package_config(self, package) -> None:
        """A probabilistic model read from its package: the package's network gives the calibrated std."""
        super().load_package_config(package)
        self.packaged_std = self.distribution is not None and "uncertainty" in ((package.get("bioflow") or {}).get("outputs") or [])
        if self.packaged_std:  # applied inside the package's network already
            self.calibration_knots.copy_(identity_knots())


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
        prediction = self.update_quality(stage, self.location(output), target, norm)
        if self.distribution is not None:
            std, error = self.calibration_pairs(batch, output)
            self.collect_calibration(stage, recalibrate(std, self.calibration_knots), error)
        self.figure_sample(stage, batch, image, prediction, target, norm)

    def calibration_pairs(self, batch, output=None):
        """CARE predicts the distribution of the clean target: every pixel of the target counts."""
        image, target = batch["image"][0], batch["target"][0]
        output = self.predict_image(image) if output is None else output
        return self.raw_std(output), self.location(output) - target


#: Noise2Void's signal std: pixels sampled per validation image to judge it (noise_model.signal_variance_share)
SIGNAL_SAMPLE = 4096


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
                 data_range: Optional[float] = None, probabilistic: bool = False, monitor: str = "val/loss",
                 monitor_mode: Literal["max", "min"] = "min") -> None:
        super().__init__(config, data_info, inference, data_range=data_range, probabilistic=probabilistic,
                         monitor=monitor, monitor_mode=monitor_mode)
        node = self.context.batch_transform
        if node is None:
            raise ConfigError("batch_transform: Noise2Void needs a blind-spot batch transform, e.g. batch_transform=n2v")
        name, kwargs = component(node)
        self.masking = None if inference else registry.create("batch_transforms", name, where="batch_transform", **kwargs)
        self._generators: dict[str, torch.Generator] = {}
        if self.distribution is not None:
            #: The noise model (a, b) per channel, variance = a * signal + b in intensity units
            #: (metrics.noise_model), fitted after training; NaN: none.
            self.register_buffer("noise_model", torch.full((self.data_info.in_channels, 2), float("nan")))
            self._calibration_samples.update(signal_val=[], signal_test=[])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.distribution is not None and "noise_model" not in state_dict:  # saved before the noise model
            state_dict = {**state_dict, "noise_model": torch.full_like(self.noise_model, float("nan"))}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def has_noise_model(self) -> bool:
        return self.distribution is not None and bool(torch.isfinite(self.noise_model).all())

    # -- the signal's uncertainty: the observation's minus the noise's --------------------------------
    def signal_std(self, raw: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """The std of the signal (normalised units) of one raw output: the recalibrated std of the
        noisy observation with the noise model's variance taken out, in intensity units."""
        from bioflow.metrics.noise_model import noise_variance

        span = (norm[1] - norm[0]).clamp(min=1e-6).reshape((-1,) + (1,) * (raw.ndim - 1))
        observed, signal = self._observed_in_units(raw, norm)
        variance = (observed * observed - noise_variance(self.noise_model.double(), signal)).clamp(min=0)
        return (variance.sqrt() / span).to(raw.dtype)

    def _observed_in_units(self, raw: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The observation's recalibrated std and the restored signal, in intensity units (float64)."""
        span = (norm[1] - norm[0]).clamp(min=1e-6).reshape((-1,) + (1,) * (raw.ndim - 1))
        return (self.uncertainty(raw) * span).double(), to_units(self.location(raw), norm).double()

    def uncertainty_names(self) -> list[str]:
        return [*super().uncertainty_names(), *(["signal_uncertainty"] if self.has_noise_model else [])]

    def uncertainty_images(self, raw: torch.Tensor, norm: torch.Tensor) -> list[torch.Tensor]:
        images = super().uncertainty_images(raw, norm)
        if self.has_noise_model:
            span = (norm[1] - norm[0]).clamp(min=1e-6).reshape((-1,) + (1,) * (raw.ndim - 1))
            images.append(self.signal_std(raw, norm) * span)
        return images

    def after_fit(self, data) -> dict[str, float]:
        """The recalibration, then the noise model, from the validation images (training images
        where there are none) and the network's restored versions of them."""
        from bioflow.metrics.noise_model import (SIGNAL_SHARE_WARNING, fit_noise_model, residual_differences,
                                                 signal_variance_share)

        extras = super().after_fit(data)
        if self.distribution is None:
            return extras
        loader = data.whole_images("val" if data.splits["val"] else "train")
        pooled: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(self.data_info.in_channels)]
        sampled: list[tuple[torch.Tensor, torch.Tensor]] = []  # (observed std, signal) at some pixels
        generator = torch.Generator().manual_seed(0)
        self.eval()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                image, norm = batch["image"][0].to(self.device), batch["norm"][0].to(self.device)
                raw = self.predict_image(image)
                restored = to_units(self.location(raw), norm)
                for c, pair in enumerate(residual_differences(to_units(image, norm), restored, seed=i)):
                    pooled[c].append(pair)
                observed, signal = (t.flatten(1).cpu() for t in self._observed_in_units(raw, norm))
                pick = torch.randperm(observed.shape[1], generator=generator)[:SIGNAL_SAMPLE]
                sampled.append((observed[:, pick], signal[:, pick]))
        try:
            fitted = [fit_noise_model(np.concatenate([s for s, _ in p]), np.concatenate([d for _, d in p])) for p in pooled]
        except ValueError:  # too few pixels
            return extras
        self.noise_model.copy_(torch.tensor(fitted, dtype=self.noise_model.dtype))
        for c, (a, b) in enumerate(fitted):
            suffix = "" if len(fitted) == 1 else f"_c{c}"
            extras.update({f"noise_model_a{suffix}": a, f"noise_model_b{suffix}": b})
        observed, signal = (torch.cat(part, dim=1) for part in zip(*sampled))
        share = extras["signal_variance_share"] = signal_variance_share(self.noise_model, observed, signal)
        if share < SIGNAL_SHARE_WARNING:
            log.warning("Noise2Void: the noise model leaves the signal %.0f%% of the predicted variance (median over "
                        "validation pixels): its std (*_signal_uncertainty.tif) is the small difference of two nearly "
                        "equal variances and may be off several-fold; read the observation's (*_uncertainty.tif)",
                        100 * share)
        return extras


    def log_metrics(self, stage: str) -> None:
        super().log_metrics(stage)
        if self.distribution is None:
            return
        pooled = self._pooled(f"signal_{stage}")
        if pooled is None or pooled[0].size < 100:
            return
        measured = calibration(*pooled)  # the signal's std against the error from the clean image
        self.calibration_tables[f"{stage}_signal"] = measured
        self.log_scores(stage, measured.summary("signal_"))

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
        if self.distribution is not None:  # every validation epoch: a quick look; the test: enough pixels
            std, error = self.calibration_pairs(batch, most_passes=2 if stage == "val" else 16)
            self.collect_calibration(stage, recalibrate(std, self.calibration_knots), error)
        if "target" not in batch:  # no clean image: the figure shows input and prediction only
            if self.wants_figure_sample(stage):
                self.figure_sample(stage, batch, image, to_units(self.location(self.predict_image(image)), norm), None, norm)
            return
        raw = self.predict_image(image)
        output = self.location(raw)
        prediction = self.update_quality(stage, output, batch["target"][0], norm)
        if self.has_noise_model:  # a clean image: the signal's std can be checked against it
            std, error = self.signal_std(raw, norm), output - batch["target"][0]
            self.collect_calibration(f"signal_{stage}", std, error)
        self.figure_sample(stage, batch, image, prediction, batch["target"][0], norm)

    def calibration_pairs(self, batch, output=None, enough: int = 2000, most_passes: int = 16):
        """Noise2Void predicts the distribution of the noisy observation at a pixel it did not see:
        held-out (blind-spot) noisy pixels count, over masked passes until ``enough`` are held out."""
        image = batch["image"][0]
        stds, errors = [], []
        while len(stds) < most_passes and sum(s.numel() for s in stds) < enough:
            masked, mask = self.masking(image[None], generator=self._generator("val"))
            blind, at = self.predict_image(masked[0]), mask[0] > 0.5
            stds.append(self.raw_std(blind)[at])
            errors.append((self.location(blind) - image)[at])
        return torch.cat(stds), torch.cat(errors)
