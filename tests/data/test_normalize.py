"""Percentile normalisation against numpy's percentiles."""

from __future__ import annotations

import numpy as np
import pytest

from bioflow.data.normalize import PercentileNorm


def test_maps_percentiles_to_zero_and_one_per_channel():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(100, 10, (50, 60)), rng.normal(5000, 300, (50, 60))]).astype(np.uint16)
    norm = PercentileNorm.fit(image, 2.0, 98.0)
    out = norm(image)
    for c in range(2):
        lo, hi = np.percentile(image[c].astype(np.float32), [2.0, 98.0])
        assert np.percentile(out[c], 2.0) == pytest.approx(0.0, abs=1e-5)
        assert np.percentile(out[c], 98.0) == pytest.approx(1.0, abs=1e-5)
        assert out[c, 0, 0] == pytest.approx((image[c, 0, 0] - lo) / (hi - lo), rel=1e-5)


def test_constant_image_does_not_blow_up():
    out = PercentileNorm.fit(np.full((1, 8, 8), 7.0))(np.full((1, 8, 8), 7.0))
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_large_images_are_subsampled_but_close():
    rng = np.random.default_rng(1)
    image = rng.gamma(2.0, 100.0, (1, 3000, 3000)).astype(np.float32)
    norm = PercentileNorm.fit(image, 1.0, 99.8)
    lo, hi = np.percentile(image[0], [1.0, 99.8])
    assert norm.low[0] == pytest.approx(lo, rel=0.02) and norm.high[0] == pytest.approx(hi, rel=0.02)


def test_dataset_mode_fits_the_pooled_training_pixels_and_applies_them_everywhere():
    from bioflow.data.normalize import Normalizer

    rng = np.random.default_rng(2)
    bright = rng.normal(200, 20, (1, 40, 40)).astype(np.float32)
    dim = rng.normal(50, 5, (1, 40, 60)).astype(np.float32)
    normalizer = Normalizer.from_config({"mode": "dataset", "low": 1.0, "high": 99.0}).fitted([bright, dim])
    pooled = np.concatenate([bright.ravel(), dim.ravel()])
    lo, hi = np.percentile(pooled, [1.0, 99.0])
    test_image = rng.normal(50, 5, (1, 10, 10)).astype(np.float32)
    norm = normalizer.norm_for(test_image)
    assert norm.low[0] == pytest.approx(lo, rel=1e-5) and norm.high[0] == pytest.approx(hi, rel=1e-5)
    # per image, the dim test image would be stretched to its own range
    per_image = Normalizer.from_config({"mode": "per_image", "low": 1.0, "high": 99.0}).norm_for(test_image)
    assert per_image(test_image).max() > 0.9 > norm(test_image).max()
    restored = Normalizer.from_dict(normalizer.as_dict(), {})
    assert restored.mode == "dataset"
    np.testing.assert_array_equal(restored.norm_for(test_image)(test_image), norm(test_image))


def test_none_mode_keeps_values_and_unknown_modes_are_config_errors():
    from bioflow.data.normalize import Normalizer
    from bioflow.errors import ConfigError

    image = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    normalizer = Normalizer.from_config({"mode": "none"}).fitted([image])
    np.testing.assert_array_equal(normalizer.norm_for(image)(image), image)
    with pytest.raises(ConfigError, match="data.normalize.mode"):
        Normalizer.from_config({"mode": "per-image"})
