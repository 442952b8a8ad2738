"""The contract checks catch broken components (each check can fail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.testing import check_model, check_batch_transform, check_loss, check_postprocessor, check_sampler


class WrongShape(torch.nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 3)  # no padding: the output shrinks

    def forward(self, x):
        return self.conv(x)


class DeadBranch(torch.nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.used = torch.nn.Conv2d(in_channels, out_channels, 1)
        self.unused = torch.nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.used(x)


class Fine(torch.nn.Module):
    bioflow_exports = ("torchscript",)

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_architecture_checks():
    check_model(Fine)
    with pytest.raises(AssertionError, match="output shape"):
        check_model(WrongShape)
    with pytest.raises(AssertionError, match="no gradient reaches"):
        check_model(DeadBranch)


def test_loss_checks():
    class VectorLoss(torch.nn.Module):
        def forward(self, prediction, target):
            return prediction.mean(dim=1)

    class DetachedLoss(torch.nn.Module):
        def forward(self, prediction, target):
            return prediction.detach().mean() + 0 * prediction.sum()

    with pytest.raises(AssertionError, match="scalar"):
        check_loss(VectorLoss)
    with pytest.raises(AssertionError, match="no gradient"):
        check_loss(DetachedLoss)


def test_postprocessor_checks():
    class Transposed:
        def __call__(self, output):
            return np.zeros(output.shape[:0:-1], np.int32) + 1

    class Floats:
        def __call__(self, output):
            return output[1]

    class Noisy:
        def __call__(self, output):
            return (output[1] > np.random.random(output.shape[1:])).astype(np.int32)

    with pytest.raises(AssertionError, match="labels must be integers"):
        check_postprocessor(Floats)
    with pytest.raises(AssertionError, match="not deterministic|no objects"):
        check_postprocessor(Noisy)
    with pytest.raises(AssertionError):
        check_postprocessor(Transposed)


def test_sampler_checks():
    from bioflow.samplers.base import EpochSampler

    class Unseeded(EpochSampler):
        def __init__(self, index, num_samples, seed):
            super().__init__(num_samples, seed)
            self.n = len(index)

        def __iter__(self):
            return iter(torch.randint(self.n, (self.num_samples,)).tolist())

    class Short(Unseeded):
        def __iter__(self):
            return iter(range(self.num_samples - 1))

    with pytest.raises(AssertionError, match="reproducible|draws differently"):
        check_sampler(Unseeded)
    with pytest.raises(AssertionError, match="expected 50 draws"):
        check_sampler(Short)


def test_batch_transform_checks():
    class Unseeded:
        def __call__(self, image, generator=None):
            mask = torch.rand(image.shape) < 0.1
            return torch.where(mask, torch.rand(image.shape), image), mask

    with pytest.raises(AssertionError, match="not reproducible"):
        check_batch_transform(Unseeded)
