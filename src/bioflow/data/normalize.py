"""Per-image percentile normalisation, the usual first step for fluorescence microscopy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Percentiles of very large images are estimated from a regular subsample of about this many pixels.
_MAX_SAMPLE = 1_000_000


@dataclass(frozen=True)
class PercentileNorm:
    """Maps the ``low`` and ``high`` percentiles of each channel to 0 and 1 (values are not clipped)."""

    low: np.ndarray  # one value per channel
    high: np.ndarray

    @classmethod
    def fit(cls, image, low: float = 1.0, high: float = 99.8) -> "PercentileNorm":
        """Percentiles of a channel-first image; large images are subsampled on a regular grid."""
        size = int(np.prod(image.shape[1:]))
        step = max(1, int(np.ceil((size / _MAX_SAMPLE) ** (1 / (image.ndim - 1)))))
        sample = np.asarray(image[(slice(None),) + (slice(None, None, step),) * (image.ndim - 1)])
        flat = sample.reshape(sample.shape[0], -1).astype(np.float32)
        lo, hi = np.percentile(flat, [low, high], axis=1)
        return cls(lo.astype(np.float32), hi.astype(np.float32))

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """Normalise a channel-first array (or a patch of one) to float32."""
        shape = (-1,) + (1,) * (array.ndim - 1)
        scale = np.maximum(self.high - self.low, 1e-6).reshape(shape)
        return ((np.asarray(array, dtype=np.float32) - self.low.reshape(shape)) / scale).astype(np.float32)

    def as_dict(self) -> dict[str, list[float]]:
        return {"low": self.low.tolist(), "high": self.high.tolist()}
