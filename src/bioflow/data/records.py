"""The unit of data: one image with its target, as a data source hands it over."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from bioflow.errors import DataError


@dataclass
class ImageRecord:
    """One image and its target.

    Attributes
    ----------
    name
        Unique within a data set; splits are made and recorded by name.
    image
        Channel-first array ``(C, Y, X)`` or ``(C, Z, Y, X)``; may be a memory map or a lazily
        read array (anything numpy can slice).
    target
        Label image ``(Y, X)`` / ``(Z, Y, X)`` (instance or class labels, integers), a
        channel-first image for restoration, or ``None`` (self-supervised tasks).
    group
        Images of the same group always land in the same split (e.g. tiles of one slide);
        defaults to ``name``.
    pixel_size
        Physical size of a pixel along each spatial axis (same order as the axes), if known.
    source
        Where the image came from (a file path, or a description of generated data).
    """

    name: str
    image: Any
    target: Any = None
    group: str | None = None
    pixel_size: tuple[float, ...] | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.image.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.image.shape[0])

    @property
    def split_group(self) -> str:
        return self.group if self.group is not None else self.name


def check_records(records: Sequence[ImageRecord], needs_target: bool) -> None:
    """Raise :class:`DataError` for problems that would make training meaningless or crash later."""
    if not records:
        raise DataError("the data source returned no images")
    seen: dict[str, str] = {}
    dims = {len(r.spatial_shape) for r in records}
    if len(dims) > 1:
        raise DataError(f"images mix 2D and 3D data ({sorted(dims)} spatial axes); use one kind per data set")
    channels = {r.channels for r in records}
    if len(channels) > 1:
        counts = ", ".join(f"{r.name}: {r.channels}" for r in records[:5])
        raise DataError(f"images have different channel counts ({counts}, ...); all must have the same")
    for r in records:
        where = r.source or r.name
        if r.name in seen:
            raise DataError(f"{where}: image name '{r.name}' occurs twice (also {seen[r.name]})")
        seen[r.name] = where
        if needs_target and r.target is None:
            raise DataError(f"{where}: image has no target (mask) but the task needs one")
        if r.target is not None:
            tshape = tuple(r.target.shape)
            if tshape != r.spatial_shape and tshape[1:] != r.spatial_shape:
                raise DataError(
                    f"{where}: image has spatial shape {r.spatial_shape} but its target has shape {tshape}"
                )


def as_channel_first(array: np.ndarray, spatial_dims: int) -> np.ndarray:
    """Add a channel axis of length 1 to an array that has only spatial axes."""
    return array[None] if array.ndim == spatial_dims else array
