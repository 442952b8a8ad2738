"""Train / validation / test split by image (never by patch), reproducible from a seed.

A split is either drawn (fractions of the image groups for validation and test, shuffled with a
seed) or given: ``data.split.val``, ``data.split.test`` and ``data.split.train`` may each be a
list of image names, file paths or folders instead of a fraction (a fixed test set is common).
Given and drawn parts combine: with ``test: [plate3]`` and ``val: 0.2`` the validation images are
drawn from the images not in the test list.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bioflow.data.records import ImageRecord
from bioflow.errors import ConfigError

SPLITS = ("train", "val", "test")


def _matches(record: ImageRecord, entry: str) -> bool:
    """Whether a split entry (a name, a glob pattern over names, a file or a folder) names ``record``."""
    if entry == record.name or fnmatch.fnmatchcase(record.name, entry):
        return True
    if not record.source:
        return False
    source, target = Path(record.source), Path(entry).expanduser()
    try:
        source, target = source.resolve(), target.resolve()
    except OSError:
        return False
    return source == target or target in source.parents


def assign_listed(records: Sequence[ImageRecord], lists: dict[str, Sequence[str]]) -> dict[str, str]:
    """Record name -> split for the records named by the given lists; every entry must name one."""
    assigned: dict[str, str] = {}
    for split, entries in lists.items():
        for entry in entries:
            hits = [r for r in records if _matches(r, str(entry))]
            if not hits:
                names = ", ".join(r.name for r in records[:5]) + (" ..." if len(records) > 5 else "")
                raise ConfigError(f"data.split.{split}: '{entry}' names no image of the data (images: {names})")
            for r in hits:
                if assigned.get(r.name, split) != split:
                    raise ConfigError(f"data.split.{split}: '{r.name}' is also listed in data.split.{assigned[r.name]}")
                assigned[r.name] = split
    return assigned


def split_records(
    records: Sequence[ImageRecord], val: float | Sequence[str], test: float | Sequence[str], seed: int,
    train: Sequence[str] | None = None, by: str = "image",
) -> dict[str, list[ImageRecord]]:
    """Assign whole images (whole groups) to train, val and test.

    ``val`` and ``test`` are fractions of the image groups, or lists of images (see the module
    docstring); ``train`` optionally lists the training images (then every image must be listed
    somewhere or drawn by a fraction). Drawn groups are sorted by name and shuffled with ``seed``,
    so the split depends only on the names, the fractions and the seed, not on the order in which
    files were listed. Each split with a non-zero fraction gets at least one group; train keeps at
    least one.

    ``by``: ``image`` (whole images), ``region`` (every image cut into a training part and held-out
    validation and test parts, see :func:`split_by_region`) or ``auto`` (by image when there are
    enough images for the splits asked, else by region).
    """
    if by not in ("image", "region", "auto"):
        raise ConfigError(f"data.split.by: 'image', 'region' or 'auto', got {by!r}")
    lists = {k: list(v) for k, v in (("train", train), ("val", val), ("test", test)) if isinstance(v, (list, tuple))}
    if lists:
        assigned = assign_listed(records, lists)
        # Fractions are drawn from the pool: the train list if given, else every unlisted image.
        if "train" in lists:
            stray = [r.name for r in records if r.name not in assigned]
            if stray:
                raise ConfigError(
                    f"data.split.train: {len(stray)} image(s) are in no split ({', '.join(stray[:5])}"
                    f"{' ...' if len(stray) > 5 else ''}); list them or leave data.split.train unset"
                )
            pool = [r for r in records if assigned[r.name] == "train"]
        else:
            pool = [r for r in records if r.name not in assigned]
        fraction = {k: 0.0 if k in lists else float(v) for k, v in (("val", val), ("test", test))}
        drawn = split_records(pool, fraction["val"], fraction["test"], seed) if pool else {s: [] for s in SPLITS}
        out = {s: [r for r in records if assigned.get(r.name) == s and s != "train"] + drawn[s] for s in SPLITS}
        if not out["train"]:
            raise ConfigError("data.split: no images are left for training")
        return out
    for key, frac in (("val", val), ("test", test)):
        if not 0.0 <= frac < 1.0:
            raise ConfigError(f"data.split.{key}: must be in [0, 1), got {frac}")
    if by == "region" or (by == "auto" and _too_few_groups(records, val, test)):
        return split_by_region(records, val, test)
    if val + test >= 1.0:
        raise ConfigError(f"data.split: val + test = {val + test} leaves no images for training")
    groups = sorted({r.split_group for r in records})
    n = len(groups)
    n_val, n_test = _held_out(n, val, test)
    if n_test + n_val >= n:
        raise ConfigError(
            f"data.split: {n} image group(s) cannot be split into train, val ({val}) and test ({test}); "
            "add images, lower the fractions, or hold out regions of each image (data.split.by=region)"
        )
    order = np.random.default_rng(seed).permutation(n)
    assignment = {}
    for rank, gi in enumerate(order):
        assignment[groups[gi]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    out: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for r in records:
        out[assignment[r.split_group]].append(r)
    return out


def _held_out(n: int, val: float, test: float) -> tuple[int, int]:
    """Groups held out for validation and test out of ``n`` (at least one for a non-zero fraction)."""
    return (max(1, round(val * n)) if val > 0 else 0), (max(1, round(test * n)) if test > 0 else 0)


def _too_few_groups(records: Sequence[ImageRecord], val: float, test: float) -> bool:
    n = len({r.split_group for r in records})
    return sum(_held_out(n, val, test)) >= n


_REGION = re.compile(r"^(?P<name>.*)\[(?P<axis>[ZYX])(?P<start>\d+):(?P<stop>\d+)\]$")


def region_record(record: ImageRecord, axis: str, start: int, stop: int) -> ImageRecord:
    """The part ``start:stop`` along spatial ``axis`` (``Z``, ``Y`` or ``X``) of an image, as a record
    of its own (a lazy view, named ``name[Y0:410]``)."""
    from bioflow.data.views import SubArray

    letters = "ZYX"[-len(record.spatial_shape):]
    position = letters.index(axis)
    box = [None] * (1 + position) + [slice(start, stop)]
    target = record.target
    if target is not None:
        channel_first = len(target.shape) == len(record.spatial_shape) + 1
        target = SubArray(target, box if channel_first else box[1:])
    return ImageRecord(
        name=f"{record.name}[{axis}{start}:{stop}]", image=SubArray(record.image, box), target=target,
        group=f"{record.split_group}[{axis}{start}:{stop}]", pixel_size=record.pixel_size, source=record.source,
        meta={**record.meta, "region": (axis, start, stop)},
    )


def split_by_region(records: Sequence[ImageRecord], val: float, test: float) -> dict[str, list[ImageRecord]]:
    """Cut every image along its longer in-plane axis (Y or X) into train | val | test parts.

    For data with too few images to hold whole images out (Noise2Void on one image or stack): the
    validation and test parts are the last ``val`` and ``test`` fractions of each image along that
    axis, the rest trains. No pixel of a held-out part is in a training patch.
    """
    out: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for r in records:
        letters = "ZYX"[-len(r.spatial_shape):]
        sizes = dict(zip(letters, r.spatial_shape))
        axis = "Y" if sizes["Y"] >= sizes["X"] else "X"
        n = sizes[axis]
        n_test = int(round(test * n)) if test > 0 else 0
        n_val = int(round(val * n)) if val > 0 else 0
        if (val > 0 and n_val < 1) or (test > 0 and n_test < 1) or n - n_val - n_test < 1:
            raise ConfigError(f"data.split: {r.name} ({n} pixels along {axis}) is too small to cut into train, val and test regions")
        cuts = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
        for split, (a, b) in cuts.items():
            if b > a:
                out[split].append(region_record(r, axis, a, b))
    return out


def split_names(splits: dict[str, list[ImageRecord]]) -> dict[str, list[str]]:
    """The split as plain names, for the run's artifact and the checkpoint."""
    return {s: sorted(r.name for r in splits[s]) for s in SPLITS}


def apply_split_names(records: Sequence[ImageRecord], names: dict[str, list[str]]) -> dict[str, list[ImageRecord]]:
    """Rebuild a recorded split; every recorded name must be present."""
    by_name = {r.name: r for r in records}
    for s in SPLITS:  # held-out regions of images are cut again
        for n in names.get(s, []):
            match = _REGION.match(n)
            if n not in by_name and match and match["name"] in by_name:
                by_name[n] = region_record(by_name[match["name"]], match["axis"], int(match["start"]), int(match["stop"]))
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
