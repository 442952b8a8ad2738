"""The noise model estimated from noisy images and their restored versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.metrics.noise_model import fit_noise_model, noise_variance, residual_differences


def scene(shape=(256, 256), seed=0) -> np.ndarray:
    """A smooth signal with edges, from 20 to 220."""
    yy, xx = np.mgrid[: shape[0], : shape[1]] / shape[0]
    blobs = (np.sin(7 * xx) * np.cos(5 * yy) > 0.2).astype(float)
    return 20 + 150 * (0.5 + 0.5 * np.sin(3 * xx + 2 * yy)) * 0.6 + 110 * blobs * 0.9


@pytest.mark.parametrize(("gain", "read"), [(0.0, 25.0**2), (2.0, 16.0), (1.0, 0.0)])
def test_poisson_gaussian_noise_is_recovered_from_a_noisy_image_and_an_imperfect_restoration(gain, read):
    rng = np.random.default_rng(1)
    clean = scene()
    noisy = clean + rng.normal(size=clean.shape) * np.sqrt(gain * clean + read)
    # a restoration with an error that varies slowly (blurred noise): what a denoiser leaves
    from scipy import ndimage

    restored = clean + ndimage.gaussian_filter(rng.normal(size=clean.shape) * 20, 4)
    (signal, difference), = residual_differences(torch.from_numpy(noisy)[None], torch.from_numpy(restored)[None])
    a, b = fit_noise_model(signal, difference)
    for level in (30.0, 200.0):  # the noise's std is right where the signal lies
        true = np.sqrt(gain * level + read)
        assert np.sqrt(a * level + b) == pytest.approx(true, rel=0.08)
    assert a >= 0 and b >= 0


def test_the_variance_is_never_negative_and_follows_each_channel():
    model = torch.tensor([[1.0, 4.0], [0.0, 9.0]])
    signal = torch.tensor([[[-5.0, 0.0, 10.0]], [[1.0, 2.0, 3.0]]])
    out = noise_variance(model, signal)
    assert torch.equal(out, torch.tensor([[[4.0, 4.0, 14.0]], [[9.0, 9.0, 9.0]]]))


def test_too_few_pixels_are_refused():
    with pytest.raises(ValueError, match="at least"):
        fit_noise_model(np.arange(10.0), np.ones(10))


def test_the_share_of_variance_left_to_the_signal():
    """Observation std 5 everywhere, noise variance 16 (a = 0, b = 16): 9 of 25 left to the signal;
    with a = 1 the noise takes more where the signal is brighter, and all of it beyond 9."""
    from bioflow.metrics.noise_model import signal_variance_share

    observed = torch.full((1, 5), 5.0)
    signal = torch.tensor([[0.0, 2.0, 4.0, 9.0, 20.0]])
    assert signal_variance_share(torch.tensor([[0.0, 16.0]]), observed, signal) == pytest.approx(9 / 25)
    # left: 9, 7, 5, 0, 0 of 25: the median is 5/25
    assert signal_variance_share(torch.tensor([[1.0, 16.0]]), observed, signal) == pytest.approx(5 / 25)
