"""Patches for training, whole images for validation and testing.

Training draws patches from a fixed index of candidate positions (a grid with half-patch stride
over every training image, so larger images offer more candidates and are drawn more often). A
sampler chooses candidates; each drawn sample comes with its own seed, which moves the patch by a
random offset of up to half a stride and drives augmentation, so a sample is reproducible whatever
the number of data-loader workers or ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from bioflow.data.augment import Augmenter
from bioflow.data.normalize import PercentileNorm
from bioflow.data.records import ImageRecord
from bioflow.conventions import IGNORE_INDEX

TargetFn = Callable[[np.ndarray], np.ndarray]


def _starts(size: int, patch: int) -> list[int]:
    if size <= patch:
        return [0]
    stride = max(1, patch // 2)
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


@dataclass
class PatchIndex:
    """Candidate patch positions over a list of images.

    Attributes
    ----------
    records
        The images the candidates are cut from.
    patch_size
        Spatial size of a patch.
    record_ids, starts
        For candidate ``i``: the index of its image and the start of the patch along each axis.
    """

    records: Sequence[ImageRecord]
    patch_size: tuple[int, ...]
    #: Maps a target patch to class indices (the task's target transform); default: labelled = 1.
    to_classes: Callable[[np.ndarray], np.ndarray] | None = None
    record_ids: np.ndarray = field(init=False)
    starts: np.ndarray = field(init=False)
    _class_counts: np.ndarray | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        ids, starts = [], []
        for i, rec in enumerate(self.records):
            axes = [_starts(s, p) for s, p in zip(rec.spatial_shape, self.patch_size)]
            grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))
            ids.append(np.full(len(grid), i))
            starts.append(grid)
        self.record_ids = np.concatenate(ids)
        self.starts = np.concatenate(starts).astype(np.int64)

    def __len__(self) -> int:
        return len(self.record_ids)

    def keep(self, selected: np.ndarray) -> None:
        """Keep only the candidates where ``selected`` is true."""
        self.record_ids = self.record_ids[selected]
        self.starts = self.starts[selected]
        if self._class_counts is not None:
            self._class_counts = self._class_counts[selected]

    def class_counts(self) -> np.ndarray:
        """Pixels of each class under each candidate, ``(candidates, classes)`` (read once, cached).

        Classes come from ``to_classes`` (the task's view of its targets), or labelled (> 0) versus
        not. Candidates of images without targets count as all background.
        """
        if self._class_counts is None:
            rows = []
            for i in range(len(self)):
                patch = self.target_patch(i)
                if patch is None:
                    rows.append(np.array([int(np.prod(self.patch_size))]))
                    continue
                classes = self.to_classes(patch) if self.to_classes is not None else (patch > 0)
                classes = np.asarray(classes).astype(np.int64).ravel()
                rows.append(np.bincount(classes[classes >= 0]))
            width = max(len(r) for r in rows)
            self._class_counts = np.stack([np.pad(r, (0, width - len(r))) for r in rows])
        return self._class_counts

    def foreground_fractions(self) -> np.ndarray:
        """Fraction of pixels of a non-background class under each candidate."""
        counts = self.class_counts()
        return counts[:, 1:].sum(axis=1) / np.maximum(counts.sum(axis=1), 1)

    def target_patch(self, i: int) -> np.ndarray | None:
        """The target under candidate ``i`` without jitter (for samplers that weigh by content)."""
        rec = self.records[self.record_ids[i]]
        if rec.target is None:
            return None
        box = tuple(slice(s, s + p) for s, p in zip(self.starts[i], self.patch_size))
        target = rec.target
        return np.asarray(target[box] if target.ndim == len(box) else target[(slice(None),) + box])


def _read_box(array, start: Sequence[int], size: Sequence[int], channel_first: bool) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Read the part of ``array`` under a box that may reach past the image; return the padding too."""
    spatial = array.shape[1:] if channel_first else array.shape
    sl, pad = [], []
    for st, sz, dim in zip(start, size, spatial):
        a, b = max(st, 0), min(st + sz, dim)
        sl.append(slice(a, b))
        pad.append((a - st, st + sz - b))
    index = ((slice(None),) if channel_first else ()) + tuple(sl)
    return np.asarray(array[index]), pad


class PatchDataset(Dataset):
    """Training patches; keys are ``(candidate index, seed)`` pairs from :class:`SeededSampler`."""

    def __init__(
        self,
        index: PatchIndex,
        norms: Sequence[PercentileNorm],
        augmenter: Augmenter,
        target_fn: TargetFn | None,
        use_targets: bool = True,
    ) -> None:
        self.index = index
        self.norms = norms
        self.augmenter = augmenter
        self.target_fn = target_fn
        self.use_targets = use_targets

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        i, seed = key
        rng = np.random.default_rng(seed)
        rec_id = int(self.index.record_ids[i])
        rec = self.index.records[rec_id]
        size = self.index.patch_size
        start = self.index.starts[i].copy()
        for ax, (st, p, dim) in enumerate(zip(start, size, rec.spatial_shape)):
            if dim > p:
                half = max(1, p // 4)
                start[ax] = int(np.clip(st + rng.integers(-half, half + 1), 0, dim - p))
        image, pad = _read_box(rec.image, start, size, channel_first=True)
        image = self.norms[rec_id](image)
        image = np.pad(image, [(0, 0)] + pad, mode="symmetric")
        target = None
        if rec.target is not None and self.use_targets:
            channel_first = rec.target.ndim == len(size) + 1
            target, _ = _read_box(rec.target, start, size, channel_first=channel_first)
            if channel_first:  # an image target (restoration): same affine normalisation as its input
                target = np.pad(self.norms[rec_id](target), [(0, 0)] + pad, mode="symmetric")
            else:
                target = np.pad(target.astype(np.int64), pad, mode="constant", constant_values=IGNORE_INDEX)
        image, target = self.augmenter(image, target, seed=int(rng.integers(2**31)))
        return _as_sample(image, target, self.target_fn, rec.name, self.norms[rec_id])


def _as_sample(image: np.ndarray, target: np.ndarray | None, target_fn: TargetFn | None, name: str,
               norm: PercentileNorm) -> dict:
    """A sample: the normalised image, the target, the name, and ``norm`` ((2, C): the intensities
    that map to 0 and 1) so that outputs can be brought back to the image's units."""
    sample = {
        "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
        "name": name,
        "norm": torch.from_numpy(np.stack([norm.low, norm.high]).astype(np.float32)),
    }
    if target is not None:
        if target_fn is not None:
            target = target_fn(target)
        sample["target"] = torch.from_numpy(np.ascontiguousarray(target))
    return sample


class WholeImageDataset(Dataset):
    """Whole normalised images with their targets, in a fixed order (validation, test)."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        norms: Sequence[PercentileNorm],
        target_fn: TargetFn | None,
    ) -> None:
        self.records = records
        self.norms = norms
        self.target_fn = target_fn

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        image = self.norms[i](np.asarray(rec.image))
        target = None
        if rec.target is not None:
            target = np.asarray(rec.target)
            # image targets are normalised like their input; label images stay integers
            target = self.norms[i](target) if target.ndim == image.ndim else target.astype(np.int64)
        return _as_sample(image, target, self.target_fn, rec.name, self.norms[i])
