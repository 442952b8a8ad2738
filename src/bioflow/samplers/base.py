"""What a sampler plugin is, and how bioflow turns its draws into seeded, sharded samples.

A sampler plugin is a callable ``(index, num_samples, seed, **kwargs) -> Sampler`` where ``index``
is a :class:`~bioflow.data.patches.PatchIndex`. The returned sampler yields ``num_samples``
candidate indices per epoch and draws the same sequence on every rank for the same seed and epoch
(:class:`EpochSampler` gives both). bioflow wraps it in :class:`SeededSampler`, which hands each
rank a disjoint share of that one sequence and gives every sample its own seed; so weighted
samplers stay weighted under DDP, which the default ``DistributedSampler`` replacement would lose.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Base for samplers that draw a fresh, reproducible sequence each epoch."""

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self) -> torch.Generator:
        """A generator seeded by (seed, epoch): the same on every rank."""
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]))
        return g

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        raise NotImplementedError


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SeededSampler(Sampler[tuple[int, int]]):
    """Shards a sampler's sequence over ranks and attaches a per-sample seed.

    Every rank gets ``ceil(n / world_size)`` samples (the last rank wraps around to the start of
    the sequence), so all ranks run the same number of steps. The seed of sample ``k`` of epoch
    ``e`` depends only on (seed, e, k).
    """

    def __init__(self, sampler: Sampler[int], seed: int) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        _, world = rank_and_world()
        return -(-len(self.sampler) // world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = rank_and_world()
        drawn = [int(i) for i in self.sampler]
        n = len(drawn)
        seeds = np.random.SeedSequence([self.seed, self.epoch]).generate_state(n, dtype=np.uint32)
        for k in range(-(-n // world)):
            pos = (rank + k * world) % n
            yield drawn[pos], int(seeds[pos])
