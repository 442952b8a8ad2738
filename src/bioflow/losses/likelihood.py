"""Probabilistic restoration: a location and a scale per pixel, trained by negative log-likelihood.

A probabilistic restoration network has twice its image's channels: channels ``:C`` are the
location (the restored image), channels ``C:`` the log of the scale, ``b = exp(r) + MIN_SCALE``
(in the normalised units the network works in). On the log scale the likelihood's gradient is of
order one (``1 - |y - mu| / b`` for Laplace); with ``softplus`` it grew as ``1 / b`` as the scale
shrank, outweighed the location's in the shared layers and held the restored image back. Each point loss
has its distribution: the mean absolute error is the negative log-likelihood of a Laplace
distribution up to its scale (its best location is the median), the mean squared error that of a
Gaussian (its best location is the mean). So ``task.probabilistic=true`` keeps what the location
estimates and adds the scale. The location is trained by the point loss itself and the scale by
the negative log-likelihood with the location held fixed (its gradient stopped): trained jointly
by the likelihood, pixels predicted as uncertain weigh less, the hard ones are given up, and the
restored image got worse (measured on the CARE demo: 8 dB lower PSNR at the same budget). The
loss is the sum of the two terms:

- Laplace ``(mu, b)``: ``-log p(y) = log(2 b) + |y - mu| / b``; standard deviation ``sqrt(2) b``;
- Gaussian ``(mu, s)``: ``-log p(y) = log(s) + (y - mu)^2 / (2 s^2) + log(2 pi) / 2``; standard deviation ``s``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: The smallest scale, in normalised units (a 16-bit image's step is about 1.5e-5 of its range).
MIN_SCALE = 1e-4
#: The raw output is the log of the scale (clipped to +-LOG_RANGE) minus LOG_START: a network whose
#: raw outputs start near 0 starts at a scale of 0.1 (a typical error of a restored image whose
#: percentiles span 0..1) rather than 1, so the scale need not first pull every pixel down.
LOG_RANGE = 15.0
LOG_START = math.log(0.1)
#: Weight of the likelihood (the scale's term) against the point loss (the location's) in the
#: layers both share: the location learns as in the plain model, the scale follows.
SCALE_WEIGHT = 0.1


def split(prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Location and positive scale from a probabilistic output ``(N, 2C, ...)`` (or ``(2C, ...)``
    with ``channel_axis`` 0: pass ``prediction[None]``)."""
    channels = prediction.shape[1] // 2
    return prediction[:, :channels], torch.exp(prediction[:, channels:].clamp(-LOG_RANGE, LOG_RANGE) + LOG_START) + MIN_SCALE


class Distribution:
    """A per-pixel distribution of location and scale: its name, negative log-likelihood and std."""

    name = ""
    std_per_scale = 1.0

    @staticmethod
    def nll(location: torch.Tensor, scale: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def std(cls, scale: torch.Tensor) -> torch.Tensor:
        return scale * cls.std_per_scale


class Laplace(Distribution):
    name = "laplace"
    std_per_scale = math.sqrt(2.0)

    @staticmethod
    def nll(location, scale, value):
        return torch.log(2 * scale) + (value - location).abs() / scale


class Gaussian(Distribution):
    name = "gaussian"

    @staticmethod
    def nll(location, scale, value):
        return torch.log(scale) + (value - location).square() / (2 * scale.square()) + 0.5 * math.log(2 * math.pi)


DISTRIBUTIONS: dict[str, type[Distribution]] = {d.name: d for d in (Laplace, Gaussian)}


def _example(spatial_dims: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (2, 1) + (16,) * spatial_dims
    prediction = torch.randn((2, 2) + shape[2:], generator=g)
    target = torch.randn(shape, generator=g)
    if masked:
        target = torch.cat([target, (torch.rand(shape, generator=g) < 0.1).float()], dim=1)
    return prediction, target


def _point_loss(distribution: str, location: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The point loss whose likelihood the distribution is: absolute (Laplace) or squared (Gaussian) error."""
    return (location - value).abs() if distribution == "laplace" else (location - value).square()


class LaplaceNLL(nn.Module):
    """Per-pixel Laplace distribution (probabilistic CARE, as CSBDeep's): the location trained by the
    absolute error, the scale by the negative log-likelihood with the location held fixed."""

    bioflow_targets = ("image",)
    bioflow_distribution = "laplace"

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        location, scale = split(prediction)
        nll = DISTRIBUTIONS[self.bioflow_distribution].nll(location.detach(), scale, target)
        return (_point_loss(self.bioflow_distribution, location, target) + SCALE_WEIGHT * nll).mean()

    @staticmethod
    def bioflow_example_inputs(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _example(spatial_dims, masked=False)


class GaussianNLL(LaplaceNLL):
    """Per-pixel Gaussian distribution: the location trained by the squared error, the scale by the
    negative log-likelihood with the location held fixed."""

    bioflow_distribution = "gaussian"


class MaskedGaussianNLL(nn.Module):
    """Gaussian negative log-likelihood at the blind spots only (probabilistic Noise2Void).

    The target stacks the original values and the mask along the channel axis, as for
    ``masked_mse``: the distribution predicted is that of the noisy observation at a pixel the
    network did not see.
    """

    bioflow_targets = ("masked_image",)
    bioflow_distribution = "gaussian"

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        location, scale = split(prediction)
        channels = location.shape[1]
        values, mask = target[:, :channels], target[:, channels:] > 0.5
        nll = DISTRIBUTIONS[self.bioflow_distribution].nll(location.detach(), scale, values)
        per_pixel = _point_loss(self.bioflow_distribution, location, values) + SCALE_WEIGHT * nll
        return torch.where(mask, per_pixel, 0.0).sum() / mask.sum().clamp(min=1)

    @staticmethod
    def bioflow_example_inputs(spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _example(spatial_dims, masked=True)
