"""A noise model estimated from the data: the pixel noise's variance as a function of the signal.

Noise2Void predicts the distribution of the *noisy observation* at a pixel it did not see; its
variance is that of the signal given the neighbourhood plus that of the noise. The uncertainty of
the restored image (the signal) is the difference. Camera noise is modelled as Poisson plus
Gaussian, ``variance = a * signal + b`` in the image's intensity units (``a``: the gain, ``b``: the
read noise's variance, both >= 0).

It is estimated from noisy images and the network's restored versions of them: the residual
``r = image - restored`` is noise plus the restoration's error, which varies slowly from pixel to
pixel, so the difference of neighbouring residuals, divided by sqrt(2), keeps the noise and drops
most of the error (and of the edges). Its robust variance (the squared, scaled median absolute
deviation) is measured in equal-count bins of the restored signal, and a line is fitted through
them.
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 16


def residual_differences(image: torch.Tensor, restored: torch.Tensor, most: int = 200_000, seed: int = 0):
    """Per channel, (signal, difference) pairs of one image ``(C, *spatial)`` in intensity units:
    the mean restored value of two neighbours along the last axis, and the difference of their
    residuals over sqrt(2). At most ``most`` seeded random pairs per channel."""
    residual = (image - restored).double()
    difference = (residual[..., 1:] - residual[..., :-1]) / np.sqrt(2.0)
    signal = (restored[..., 1:] + restored[..., :-1]).double() / 2
    out = []
    for c in range(image.shape[0]):
        s, d = signal[c].reshape(-1), difference[c].reshape(-1)
        if s.numel() > most:
            keep = torch.randperm(s.numel(), generator=torch.Generator().manual_seed(seed))[:most]
            s, d = s[keep], d[keep]
        out.append((s.cpu().numpy(), d.cpu().numpy()))
    return out


def fit_noise_model(signal: np.ndarray, difference: np.ndarray, bins: int = BINS) -> tuple[float, float]:
    """``(a, b)`` of ``variance = a * signal + b`` from pooled pairs (:func:`residual_differences`)."""
    signal, difference = np.asarray(signal, np.float64), np.asarray(difference, np.float64)
    keep = np.isfinite(signal) & np.isfinite(difference)
    signal, difference = signal[keep], difference[keep]
    if signal.size < 10 * bins:
        raise ValueError(f"a noise model needs at least {10 * bins} pixels, got {signal.size}")
    order = np.argsort(signal)
    centres, variances = [], []
    for part in np.array_split(order, bins):
        d = difference[part]
        centres.append(float(np.median(signal[part])))
        variances.append(float((1.4826 * np.median(np.abs(d - np.median(d)))) ** 2))
    centres, variances = np.asarray(centres), np.asarray(variances)
    if np.ptp(centres) <= 0:
        return 0.0, float(np.mean(variances))
    a, b = np.polyfit(centres, variances, 1)
    if a < 0:  # noise that falls with the signal is no camera's: one level everywhere
        return 0.0, float(np.mean(variances))
    if b < 0:  # through the origin: Poisson noise alone
        return float(np.sum(centres * variances) / max(np.sum(centres * centres), 1e-12)), 0.0
    return float(a), float(b)


def noise_variance(model: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """The noise variance at ``signal (C, *spatial)`` (intensity units) for ``model (C, 2)`` = (a, b)."""
    shape = (-1,) + (1,) * (signal.ndim - 1)
    a, b = model[:, 0].reshape(shape).to(signal), model[:, 1].reshape(shape).to(signal)
    return (a * signal.clamp(min=0) + b).clamp(min=0)


#: The median share of the predicted variance left to the signal below which its std is too
#: uncertain to read: a 10% error of the observation's std (about what recalibration leaves) is
#: then an error of more than 2-fold in the signal's variance.
SIGNAL_SHARE_WARNING = 0.25


def signal_variance_share(model: torch.Tensor, observed: torch.Tensor, signal: torch.Tensor) -> float:
    """Median over pixels of the share of the observation's variance (``observed``: its std,
    ``(C, N)``, intensity units) that the noise ``model`` leaves to the signal at ``signal (C, N)``;
    the signal's std is the square root of what is left, so a small share makes it fragile."""
    variance = (observed.double() ** 2).clamp(min=1e-30)
    left = (variance - noise_variance(model.double(), signal.double())).clamp(min=0)
    return float((left / variance).median())
