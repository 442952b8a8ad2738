"""Samplers for unbalanced data: rare classes or foreground drawn more often than they occur.

Weighted sampling changes what the network sees during training: it learns the classes as if they
were as frequent as they are drawn, which raises recall of rare classes but can bias predictions
towards them (more false positives). Per-class validation scores show the effect.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

import numpy as np
import torch

from bioflow.samplers.base import EpochSampler

log = logging.getLogger(__name__)


class ClassWeightedSampler(EpochSampler):
    """Candidates drawn with replacement, each weighted by the rarest class it contains.

    Parameters
    ----------
    class_weights
        One weight per class (background first). Default: the inverse of each class's pixel
        frequency over all candidates, so a patch showing the rarest class present in the data is
        drawn as often as its rarity demands.
    min_pixels
        A class counts as present in a patch from this many pixels on.

    A candidate's weight is the largest weight among the classes present in it (with inverse
    frequencies: the weight of its rarest class).
    """

    def __init__(self, index, num_samples: int, seed: int, class_weights: Optional[list[float]] = None,
                 min_pixels: int = 1) -> None:
        super().__init__(num_samples, seed)
        counts = index.class_counts().astype(np.float64)
        totals = counts.sum(axis=0)
        if class_weights is None:
            per_class = np.where(totals > 0, totals.sum() / np.maximum(totals, 1), 0.0)
        else:
            per_class = np.asarray(class_weights, dtype=np.float64)
            if len(per_class) < counts.shape[1]:
                raise ValueError(
                    f"sampler.class_weights has {len(per_class)} entries but the targets have {counts.shape[1]} classes"
                )
            per_class = per_class[: counts.shape[1]]
        present = counts >= min_pixels
        weights = np.where(present, per_class[None, :], 0.0).max(axis=1)
        if not (weights > 0).any():
            weights = np.ones(len(weights))
        self.weights = torch.as_tensor(weights / weights.sum(), dtype=torch.float64)
        self.class_weights = per_class

    def __iter__(self) -> Iterator[int]:
        yield from torch.multinomial(self.weights, self.num_samples, replacement=True, generator=self.generator()).tolist()


class ForegroundSampler(EpochSampler):
    """With probability ``foreground_probability`` a candidate showing foreground, otherwise any candidate.

    Parameters
    ----------
    foreground_probability
        Share of draws restricted to candidates with foreground.
    min_fraction
        A candidate shows foreground when more than this fraction of its pixels is non-background.
    """

    def __init__(self, index, num_samples: int, seed: int, foreground_probability: float = 0.5,
                 min_fraction: float = 0.0) -> None:
        super().__init__(num_samples, seed)
        if not 0.0 <= foreground_probability <= 1.0:
            raise ValueError(f"foreground_probability must be in [0, 1], got {foreground_probability}")
        self.probability = foreground_probability
        self.num_candidates = len(index)
        self.foreground = torch.as_tensor(np.flatnonzero(index.foreground_fractions() > min_fraction))
        if len(self.foreground) == 0:
            log.warning("sampler: no training patch shows foreground; drawing uniformly")

    def __iter__(self) -> Iterator[int]:
        g = self.generator()
        uniform = torch.randint(self.num_candidates, (self.num_samples,), generator=g)
        if len(self.foreground) == 0:
            yield from uniform.tolist()
            return
        picks = self.foreground[torch.randint(len(self.foreground), (self.num_samples,), generator=g)]
        use_foreground = torch.rand(self.num_samples, generator=g) < self.probability
        yield from torch.where(use_foreground, picks, uniform).tolist()
