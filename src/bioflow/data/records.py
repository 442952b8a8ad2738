"""The unit of data: one image with its target, as a data source hands it over."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bioflow.errors import DataError

log = logging.getLogger(__name__)


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


def blocks(array, max_elements: int = 1 << 24):
    """Read a (lazy) array in slabs along its first axis, each of at most about ``max_elements``."""
    per_row = max(1, int(np.prod(array.shape[1:])))
    step = max(1, max_elements // per_row)
    for start in range(0, array.shape[0], step):
        yield np.asarray(array[start:start + step])


def check_target_kind(records: Sequence[ImageRecord], target_kind: str, task: str) -> None:
    """Raise :class:`DataError` when the data's targets are not what the task trains on.

    ``target_kind``: ``mask`` (label masks), ``image`` (target images) or ``optional_image``
    (images, or none: a label mask is an error).
    """
    for r in records:
        if r.target is None:
            continue
        where = r.source or r.name
        is_mask = len(r.target.shape) == len(r.spatial_shape)
        if target_kind == "mask" and not is_mask:
            raise DataError(
                f"{where}: task '{task}' needs label masks (one integer per object or class), but this target is an "
                "image; give masks with data=tiff_folder data.source.masks=..."
            )
        if target_kind == "image" and is_mask:
            raise DataError(
                f"{where}: task '{task}' learns from target images (data=tiff_pairs data.source.targets=...), "
                "not label masks"
            )
        if target_kind == "optional_image" and is_mask:
            raise DataError(
                f"{where}: task '{task}' trains on the noisy images alone and takes no masks; remove them "
                "(data.source.masks=null)"
            )


def check_records(
    records: Sequence[ImageRecord], needs_target: bool, allow_empty_targets: bool = False, mask_targets: bool = True
) -> None:
    """Raise :class:`DataError` for problems that would make training meaningless or crash later.

    Checks names, dimensionality, channel counts, image/target shapes, non-finite pixels in
    floating-point images, and label masks without any object (an error unless
    ``allow_empty_targets``, then a warning). Large images are scanned slab by slab.
    """
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
                if "target_source" in r.meta:
                    raise DataError(f"{r.meta['target_source']}: shape {tshape} does not fit its image "
                                    f"{Path(where).name} {r.spatial_shape}")
                raise DataError(
                    f"{where}: image has spatial shape {r.spatial_shape} but its target has shape {tshape}"
                )
        check_finite(r.image, where)
        if r.target is not None and not mask_targets:
            check_finite(r.target, f"{where} (target)")
        if r.target is not None and mask_targets and not any(b.any() for b in blocks(r.target)):
            if not allow_empty_targets:
                raise DataError(
                    f"{where}: the mask is all zero (no objects); set data.allow_empty_masks=true if "
                    "images without objects are intended"
                )
            log.warning("%s: the mask is all zero (no objects)", where)


def check_informative(records: Sequence[ImageRecord], masks: bool, to_classes=None) -> None:
    """Raise :class:`DataError` when the training images cannot teach anything: every one is
    constant (no contrast), or, for segmentation, no mask has any foreground."""
    constant = [r for r in records if _is_constant(r.image)]
    if constant and len(constant) == len(records):
        others = f" and {len(constant) - 1} more" if len(constant) > 1 else ""
        raise DataError(f"{constant[0].source or constant[0].name}{others}: every training image is constant "
                        "(one value everywhere); nothing to learn")
    for r in constant:
        log.warning("%s: the image is constant (one value everywhere)", r.source or r.name)
    if masks and all(r.target is not None for r in records):
        def has_foreground(target) -> bool:
            for block in blocks(target):
                classes = to_classes(block) if to_classes is not None else block
                if (np.asarray(classes) > 0).any():
                    return True
            return False

        if not any(has_foreground(r.target) for r in records):
            raise DataError(
                f"{records[0].source or records[0].name} ...: no training mask has any foreground "
                f"({len(records)} image(s)); the model would learn background only"
            )


def _is_constant(image) -> bool:
    low = high = None
    for block in blocks(image):
        b_low, b_high = np.min(block), np.max(block)
        low = b_low if low is None else min(low, b_low)
        high = b_high if high is None else max(high, b_high)
        if low != high:
            return False
    return True


def check_finite(array, where: str, when: str = "training") -> None:
    """Raise :class:`DataError` if a floating-point image has NaN or infinite pixels."""
    if not np.issubdtype(np.dtype(array.dtype), np.floating):
        return
    for block in blocks(array):
        if not np.isfinite(block).all():
            kind = "NaN" if np.isnan(block).any() else "infinite"
            raise DataError(f"{where}: the image has {kind} pixel values; fix or mask them before {when}")
