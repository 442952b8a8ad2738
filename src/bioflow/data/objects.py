"""Object sizes in label masks, to compare with a network's receptive field.

A CNN can only judge an object it sees whole: objects larger than the receptive field are
segmented from local texture alone, which tends to fail quietly (holes, split objects). The size
of an object here is the longest side of its bounding box, in pixels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from bioflow.data.records import ImageRecord


def object_extents(mask: np.ndarray, instances: bool) -> np.ndarray:
    """Longest bounding-box side of every object of a mask.

    With ``instances`` every label value is one object (touching objects stay apart), unless the
    mask holds a single label value: then it is a binary mask (0/1, 0/255), whose objects are its
    connected components, not the one value. Otherwise objects are the connected components of each
    class value.
    """
    mask = np.asarray(mask)
    values = np.unique(mask[mask > 0])
    if instances and values.size > 1:
        boxes = [b for b in ndimage.find_objects(np.where(mask > 0, mask, 0).astype(np.int64)) if b is not None]
    else:
        boxes = []
        for value in values:
            components, _ = ndimage.label(mask == value)
            boxes += [b for b in ndimage.find_objects(components) if b is not None]
    return np.array([max(s.stop - s.start for s in b) for b in boxes], dtype=np.int64)


def object_size_summary(records: Sequence[ImageRecord], instances: bool, max_images: int = 64) -> dict[str, float] | None:
    """Median, 90th percentile and count of object extents over (at most ``max_images``) records."""
    extents = [object_extents(np.asarray(r.target), instances) for r in list(records)[:max_images] if r.target is not None]
    values = np.concatenate(extents) if extents else np.array([])
    if values.size == 0:
        return None
    return {
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "count": int(values.size),
    }
