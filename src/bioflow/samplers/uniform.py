"""The plain random sampler: candidates drawn uniformly, with replacement."""

from __future__ import annotations

from typing import Iterator

import torch

from bioflow.samplers.base import EpochSampler


class UniformSampler(EpochSampler):
    """Draws ``num_samples`` candidates uniformly with replacement (images weighted by their size)."""

    def __init__(self, index, num_samples: int, seed: int) -> None:
        super().__init__(num_samples, seed)
        self.num_candidates = len(index)

    def __iter__(self) -> Iterator[int]:
        yield from torch.randint(self.num_candidates, (self.num_samples,), generator=self.generator()).tolist()
