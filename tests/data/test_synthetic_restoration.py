"""The synthetic restoration pairs: deterministic, with the noise they claim."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bioflow.data.synthetic_restoration import synthetic_restoration_pair


def test_deterministic_and_in_range():
    a = synthetic_restoration_pair((96, 80), seed=3, index=1)
    b = synthetic_restoration_pair((96, 80), seed=3, index=1)
    c = synthetic_restoration_pair((96, 80), seed=3, index=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    clean = a[1]
    assert clean.min() >= 0 and clean.max() == pytest.approx(255.0) and clean.std() > 10


def test_gaussian_noise_has_the_requested_sigma():
    noisy, clean = synthetic_restoration_pair((256, 256), seed=0, noise="gaussian", sigma=25.0)
    residual = noisy - clean
    assert abs(residual.mean()) < 0.5 and residual.std() == pytest.approx(25.0, rel=0.02)
    assert 10 * np.log10(255**2 / np.mean(residual**2)) == pytest.approx(20.17, abs=0.1)


def test_poisson_gaussian_is_unbiased_around_the_blurred_signal():
    noisy, clean = synthetic_restoration_pair((256, 256), seed=0, noise="poisson_gaussian", sigma=2.0, photons=50.0, blur=1.5)
    blurred = ndimage.gaussian_filter(clean, 1.5)
    residual = noisy - blurred
    assert abs(residual.mean()) < 0.5
    # shot noise: variance grows with the signal (var = signal * peak / photons + sigma^2)
    bright, dark = blurred > 150, blurred < 20
    assert residual[bright].var() > 4 * residual[dark].var()
    expected = (blurred[bright] * 255 / 50).mean() + 4
    assert residual[bright].var() == pytest.approx(expected, rel=0.15)
