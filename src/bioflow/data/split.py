"""Train / validation / test split by image (never by patch), reproducible from a seed."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bioflow.data.records import ImageRecord
from bioflow.errors import ConfigError

SPLITS = ("train", "val", "test")


def split_records(
    records: Sequence[ImageRecord], val: float, test: float, seed: int
) -> dict[str, list[ImageRecord]]:
    """Assign whole images (whole groups) to train, val and test.

    Groups are sorted by name and shuffled with ``seed``, so the split depends only on the names,
    the fractions and the seed, not on the order in which files were listed. Each split with a
    non-zero fraction gets at least one group; train keeps at least one.
    """
    for key, frac in (("val", val), ("test", test)):
        if not 0.0 <= frac < 1.0:
            raise ConfigError(f"data.split.{key}: must be in [0, 1), got {frac}")
    if val + test >= 1.0:
        raise ConfigError(f"data.split: val + test = {val + test} leaves no images for training")
    groups = sorted({r.split_group for r in records})
    n = len(groups)
    n_test = max(1, round(test * n)) if test > 0 else 0
    n_val = max(1, round(val * n)) if val > 0 else 0
    if n_test + n_val >= n:
        raise ConfigError(
            f"data.split: {n} image group(s) cannot be split into train, val ({val}) and test ({test}); "
            "add images or lower the fractions"
        )
    order = np.random.default_rng(seed).permutation(n)
    assignment = {}
    for rank, gi in enumerate(order):
        assignment[groups[gi]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    out: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for r in records:
        out[assignment[r.split_group]].append(r)
    return out


def split_names(splits: dict[str, list[ImageRecord]]) -> dict[str, list[str]]:
    """The split as plain names, for the run's artifact and the checkpoint."""
    return {s: sorted(r.name for r in splits[s]) for s in SPLITS}


def apply_split_names(records: Sequence[ImageRecord], names: dict[str, list[str]]) -> dict[str, list[ImageRecord]]:
    """Rebuild a recorded split; every recorded name must be present."""
    by_name = {r.name: r for r in records}
    out: dict[str, list[ImageRecord]] = {}
    for s in SPLITS:
        missing = [n for n in names.get(s, []) if n not in by_name]
        if missing:
            raise ConfigError(
                f"the recorded {s} split names image(s) the data source no longer provides: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        out[s] = [by_name[n] for n in names.get(s, [])]
    return out
