"""Calibration of a predicted std: measured in equal-count bins, corrected by a monotone map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.metrics.calibration import BINS, calibration, fit_knots, identity_knots, recalibrate


def draws(n: int = 200_000, seed: int = 0):
    """Per-pixel true std over two decades, and errors drawn with exactly that std."""
    rng = np.random.default_rng(seed)
    true = np.exp(rng.uniform(np.log(0.01), np.log(1.0), n))
    return true, rng.normal(0, true)


def test_a_calibrated_std_measures_as_calibrated_and_a_halved_one_off_by_two():
    true, error = draws()
    exact = calibration(true, error)
    assert exact.count.sum() == true.size and len(exact.count) == BINS
    assert exact.mean_abs_log_ratio < 0.02 and exact.worst_ratio_error < 0.05
    halved = calibration(true / 2, error)
    assert halved.mean_abs_log_ratio == pytest.approx(np.log(2), abs=0.02)
    np.testing.assert_allclose(halved.ratios, 2, rtol=0.05)


def test_the_recalibration_fitted_on_one_split_corrects_another():
    true, error = draws(seed=1)
    predicted = 0.3 * true ** 1.5  # too small, and wrong in shape: a monotone map of the truth
    knots = fit_knots(calibration(predicted, error))
    held_true, held_error = draws(seed=2)
    held = recalibrate(torch.from_numpy(0.3 * held_true ** 1.5), knots).numpy()
    before = calibration(0.3 * held_true ** 1.5, held_error)
    after = calibration(held, held_error)
    assert before.mean_abs_log_ratio > 0.5
    assert after.mean_abs_log_ratio < 0.05 and after.worst_ratio_error < 0.25


def test_recalibration_is_monotone_the_identity_changes_nothing_and_keeps_its_shape():
    std = torch.logspace(-5, 2, 200)
    assert torch.allclose(recalibrate(std, identity_knots()), std, rtol=1e-4)
    true, error = draws(seed=3)
    knots = fit_knots(calibration(true * np.where(true > 0.1, 1.0, 3.0), error))  # non-monotone miscalibration
    assert knots.shape == identity_knots().shape  # stored as a buffer of fixed shape
    mapped = recalibrate(std, knots)
    assert torch.all(mapped[1:] >= mapped[:-1] * (1 - 1e-5)) and torch.all(mapped > 0)


def test_too_few_pixels_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="calibration bins"):
        calibration(np.ones(5), np.ones(5))


def test_bins_of_one_predicted_std_get_one_calibrated_std():
    """A model that predicts one std everywhere: its bins share it, and the recalibration maps it
    to one value (their pooled RMSE), with no step between the knots it nudges apart."""
    rng = np.random.default_rng(0)
    std = np.full(10_000, 0.05)
    error = rng.normal(size=10_000) * np.linspace(0.02, 0.2, 10_000)  # errors that vary, a std that does not
    knots = fit_knots(calibration(std, error))
    assert torch.allclose(knots[1], knots[1][0].expand_as(knots[1]))
    assert float(knots[1][0]) == pytest.approx(float(np.sqrt(np.mean(error**2))), rel=1e-3)
    near = torch.tensor([0.05 * (1 - 1e-6), 0.05, 0.05 * (1 + 1e-6)])
    out = recalibrate(near, knots)
    assert float(out.max() / out.min()) < 1 + 1e-4
