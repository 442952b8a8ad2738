"""Intensity normalisation: percentiles of each image, of the whole training split, or none.

Fluorescence images are brought to a common range before the network sees them: the ``low`` and
``high`` percentiles of each channel map to 0 and 1. Three modes (``data.normalize.mode``):

* ``per_image``: every image by its own percentiles. Robust to brightness that varies between
  acquisitions, but an image that lacks the brightest objects is stretched (its objects then look
  brighter than in training).
* ``dataset``: one mapping for all images, from the percentiles of the training split's pixels
  pooled. Stored with the model and applied unchanged to validation, test and prediction, so
  intensities keep their meaning across images of one acquisition setting.
* ``none``: the raw values as float32 (for data that is normalised already).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

# Percentiles of very large images are estimated from a regular subsample of about this many pixels.
_MAX_SAMPLE = 1_000_000
MODES = ("per_image", "dataset", "none")


def _sample(image, max_pixels: int) -> np.ndarray:
    """A regular subsample ``(C, n)`` of a channel-first image with about ``max_pixels`` pixels."""
    size = int(np.prod(image.shape[1:]))
    step = max(1, int(np.ceil((size / max(max_pixels, 1)) ** (1 / (image.ndim - 1)))))
    sample = np.asarray(image[(slice(None),) + (slice(None, None, step),) * (image.ndim - 1)])
    return sample.reshape(sample.shape[0], -1).astype(np.float32)


@dataclass(frozen=True)
class PercentileNorm:
    """Maps ``low`` to 0 and ``high`` to 1, per channel (values are not clipped)."""

    low: np.ndarray  # one value per channel
    high: np.ndarray

    @classmethod
    def fit(cls, image, low: float = 1.0, high: float = 99.8) -> "PercentileNorm":
        """Percentiles of a channel-first image; large images are subsampled on a regular grid."""
        lo, hi = np.percentile(_sample(image, _MAX_SAMPLE), [low, high], axis=1)
        return cls(lo.astype(np.float32), hi.astype(np.float32))

    @classmethod
    def fit_many(cls, images: Sequence[Any], low: float = 1.0, high: float = 99.8) -> "PercentileNorm":
        """Percentiles of the pixels of several images pooled (each image weighs by its size)."""
        sizes = np.array([float(np.prod(im.shape[1:])) for im in images])
        budget = np.maximum(1, (_MAX_SAMPLE * sizes / sizes.sum()).astype(int))
        pooled = np.concatenate([_sample(im, int(b)) for im, b in zip(images, budget)], axis=1)
        lo, hi = np.percentile(pooled, [low, high], axis=1)
        return cls(lo.astype(np.float32), hi.astype(np.float32))

    @classmethod
    def identity(cls, channels: int) -> "PercentileNorm":
        return cls(np.zeros(channels, np.float32), np.ones(channels, np.float32))

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """Normalise a channel-first array (or a patch of one) to float32."""
        shape = (-1,) + (1,) * (array.ndim - 1)
        scale = np.maximum(self.high - self.low, 1e-6).reshape(shape)
        return ((np.asarray(array, dtype=np.float32) - self.low.reshape(shape)) / scale).astype(np.float32)

    def as_dict(self) -> dict[str, list[float]]:
        return {"low": self.low.tolist(), "high": self.high.tolist()}


@dataclass(frozen=True)
class Normalizer:
    """How every image of a model's data is normalised (see the module docstring).

    ``fixed`` holds the one mapping of the ``dataset`` mode (fitted on the training split) or of
    ``none``; it is None for ``per_image``.
    """

    mode: str = "per_image"
    low: float = 1.0
    high: float = 99.8
    fixed: PercentileNorm | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Normalizer":
        mode = cfg.get("mode", "per_image")
        if mode not in MODES:
            from bioflow.errors import ConfigError

            raise ConfigError(f"data.normalize.mode: '{mode}' is not one of {', '.join(MODES)}")
        return cls(mode, float(cfg.get("low", 1.0)), float(cfg.get("high", 99.8)))

    def fitted(self, train_images: Sequence[Any]) -> "Normalizer":
        """This normaliser with its fixed mapping fitted on the training images (if the mode has one)."""
        if self.mode == "dataset":
            return Normalizer(self.mode, self.low, self.high, PercentileNorm.fit_many(train_images, self.low, self.high))
        if self.mode == "none":
            return Normalizer(self.mode, self.low, self.high, PercentileNorm.identity(int(train_images[0].shape[0])))
        return self

    def norm_for(self, image) -> PercentileNorm:
        """The mapping applied to ``image`` (channel-first)."""
        if self.mode == "per_image":
            return PercentileNorm.fit(image, self.low, self.high)
        if self.fixed is None:
            raise RuntimeError(f"the '{self.mode}' normalisation is used before it was fitted")
        return self.fixed

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return {"mode": self.mode, "low": self.low, "high": self.high,
                "fixed": None if self.fixed is None else self.fixed.as_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, cfg: Mapping[str, Any]) -> "Normalizer":
        """The normaliser stored in a checkpoint; models saved before it was stored used ``cfg``
        (percentiles of each image)."""
        if not data:
            return cls.from_config({"mode": "per_image", **{k: v for k, v in cfg.items() if k != "mode"}})
        fixed = data.get("fixed")
        norm = None if fixed is None else PercentileNorm(np.asarray(fixed["low"], np.float32), np.asarray(fixed["high"], np.float32))
        return cls(data["mode"], float(data["low"]), float(data["high"]), norm)
