"""Lazy views of images: a box of an image (a held-out region), or some of its channels.

A :class:`SubArray` reads nothing itself: slicing it slices the array below it (a memory map, a
:class:`~bioflow.data.lazy.LazyTiff`, a numpy array), so a region of a large file stays on disk.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bioflow.data.lazy import LazyArray, basic_key


def _as_slice(r: range) -> slice:
    stop = r.stop if r.step > 0 or r.stop >= 0 else None
    return slice(r.start, stop, r.step)


class SubArray(LazyArray):
    """The part of ``base`` inside ``box`` (a slice per axis, ``None`` for whole axes), with the
    entries ``channels`` of the first axis only (``None``: all)."""

    def __init__(self, base: Any, box: Sequence[slice | None] | None = None, channels: Sequence[int] | None = None) -> None:
        self.base = base
        shape = tuple(int(s) for s in base.shape)
        box = list(box or []) + [None] * (len(shape) - len(box or []))
        self.ranges = [range(*(b or slice(None)).indices(n)) for b, n in zip(box, shape)]
        self.channels = None if channels is None else [int(c) for c in channels]
        if self.channels is not None:
            self.ranges[0] = range(len(self.channels))
        self.shape = tuple(len(r) for r in self.ranges)
        self.dtype = np.dtype(base.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = basic_key(key, self.ndim)
        base_key: list[Any] = []
        channel_pick = None
        for axis, (k, r) in enumerate(zip(key, self.ranges)):
            if axis == 0 and self.channels is not None:
                picked = range(len(self.channels))[k]
                channel_pick = [self.channels[i] for i in picked] if isinstance(picked, range) else self.channels[picked]
                base_key.append(slice(None))
                continue
            sub = r[k]
            base_key.append(_as_slice(sub) if isinstance(sub, range) else sub)
        data = np.asarray(self.base[tuple(base_key)])
        if channel_pick is not None:
            data = data[channel_pick]
        return data

    def __repr__(self) -> str:
        return f"SubArray({self.base!r}, shape={self.shape})"


def channel_indices(wanted: Sequence[int | str], channels: int, names: Sequence[str] | None, where: str) -> list[int]:
    """Channel indices for ``data.channels`` entries: indices, or names from the file's metadata."""
    from bioflow.errors import ConfigError

    out = []
    for entry in wanted:
        if isinstance(entry, str) and not entry.lstrip("-").isdigit():
            if not names or entry not in names:
                known = ", ".join(names) if names else "none recorded; use indices"
                raise ConfigError(f"data.channels: {where} has no channel named '{entry}' (its channel names: {known})")
            out.append(list(names).index(entry))
            continue
        index = int(entry)
        if not -channels <= index < channels:
            raise ConfigError(f"data.channels: channel {index} does not exist in {where}, which has {channels} channel(s)")
        out.append(index % channels)
    return out


def select_channels(record, wanted: Sequence[int | str] | None):
    """``record`` with only the ``wanted`` channels of its image (a lazy view)."""
    if not wanted:
        return record
    import dataclasses

    where = record.source or record.name
    picked = channel_indices(wanted, record.channels, record.meta.get("channel_names"), where)
    names = record.meta.get("channel_names")
    meta = {**record.meta, "channel_names": [names[i] for i in picked]} if names else dict(record.meta)
    return dataclasses.replace(record, image=SubArray(record.image, channels=picked), meta=meta)
