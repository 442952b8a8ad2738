"""What a model knows about the data it was trained on (stored in its checkpoint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DataInfo:
    """Channels, dimensionality, pixel size, split and normalisation of a model's training data."""

    in_channels: int
    spatial_dims: int
    pixel_size: list[float] | None = None
    split: dict[str, list[str]] = field(default_factory=dict)
    #: How images are normalised (:meth:`bioflow.data.normalize.Normalizer.as_dict`); None in
    #: models saved before it was stored: percentiles of each image.
    normalization: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
