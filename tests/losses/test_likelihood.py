"""Likelihood losses: their minimum is at the distribution's own location and scale."""

from __future__ import annotations

import math

import torch

from bioflow.losses.likelihood import MIN_SCALE, SCALE_WEIGHT, GaussianNLL, LaplaceNLL, MaskedGaussianNLL, split


def fit_constant(loss_fn, values: torch.Tensor, steps: int = 1500) -> tuple[float, float]:
    """The one location and std that minimise ``loss_fn`` over ``values``."""
    params = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([params], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        prediction = params.reshape(1, 2, 1, 1).expand(1, 2, *values.shape[2:])
        loss_fn(prediction, values).backward()
        optimizer.step()
    location, scale = split(params.detach().reshape(1, 2, 1, 1))
    return float(location), float(scale)


def test_laplace_nll_is_minimised_by_the_median_and_the_mean_absolute_deviation():
    values = torch.distributions.Laplace(3.0, 0.5).sample((1, 1, 64, 64), ).reshape(1, 1, 64, 64)
    location, scale = fit_constant(LaplaceNLL(), values)
    assert abs(location - float(values.median())) < 0.02
    assert abs(scale - float((values - values.median()).abs().mean())) < 0.02


def test_gaussian_nll_is_minimised_by_the_mean_and_the_std():
    values = (2.0 + 0.3 * torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    location, scale = fit_constant(GaussianNLL(), values)
    assert abs(location - float(values.mean())) < 0.01
    assert abs(scale - float(values.std(unbiased=False))) < 0.01


def test_the_masked_gaussian_nll_counts_the_blind_spots_only():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2, 1, 16, 16, generator=g)
    mask = torch.rand(2, 1, 16, 16, generator=g) < 0.1
    prediction = torch.randn(2, 2, 16, 16, generator=g)
    loss = MaskedGaussianNLL()(prediction, torch.cat([values, mask.float()], dim=1))
    location, scale = split(prediction)
    nll = scale.log() + (values - location) ** 2 / (2 * scale**2) + 0.5 * math.log(2 * math.pi)
    expected = ((values - location) ** 2 + SCALE_WEIGHT * nll)[mask].mean()  # the point loss for the location, plus the likelihood
    assert torch.allclose(loss, expected)
    changed = torch.where(mask, values, values + 100)  # pixels outside the mask do not count
    assert torch.allclose(MaskedGaussianNLL()(prediction, torch.cat([changed, mask.float()], dim=1)), loss)


def test_the_scale_is_positive_however_negative_the_raw_output():
    _, scale = split(torch.full((1, 2, 2, 2), -1e4))
    assert torch.all(scale >= MIN_SCALE)


def test_the_location_learns_from_the_point_loss_alone():
    """The likelihood term does not pull the location: its gradient is that of the absolute error."""
    g = torch.Generator().manual_seed(2)
    prediction = torch.randn(1, 2, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(1, 1, 8, 8, generator=g)
    LaplaceNLL()(prediction, target).backward()
    expected = torch.sign(prediction.detach()[:, :1] - target) / target.numel()
    assert torch.allclose(prediction.grad[:, :1], expected)
