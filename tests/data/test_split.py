"""Splits by image: disjoint, reproducible, independent of listing order, groups kept together."""

from __future__ import annotations

import numpy as np
import pytest

from bioflow.data.records import ImageRecord
from bioflow.data.split import apply_split_names, split_names, split_records
from bioflow.errors import ConfigError


def records(n: int, groups: int | None = None) -> list[ImageRecord]:
    img = np.zeros((1, 4, 4))
    return [
        ImageRecord(name=f"img{i:02d}", image=img, group=None if groups is None else f"g{i % groups}")
        for i in range(n)
    ]


def test_disjoint_complete_and_sized():
    splits = split_records(records(20), val=0.2, test=0.25, seed=3)
    names = {s: {r.name for r in v} for s, v in splits.items()}
    assert len(names["test"]) == 5 and len(names["val"]) == 4 and len(names["train"]) == 11
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert set().union(*names.values()) == {f"img{i:02d}" for i in range(20)}


def test_reproducible_and_order_independent():
    a = split_names(split_records(records(15), 0.2, 0.2, seed=7))
    b = split_names(split_records(list(reversed(records(15))), 0.2, 0.2, seed=7))
    c = split_names(split_records(records(15), 0.2, 0.2, seed=8))
    assert a == b
    assert a != c


def test_groups_stay_together():
    splits = split_records(records(30, groups=6), 0.2, 0.2, seed=0)
    for split, recs in splits.items():
        for other, orecs in splits.items():
            if split != other:
                assert not ({r.group for r in recs} & {r.group for r in orecs})


def test_recorded_split_is_reapplied():
    recs = records(10)
    names = split_names(split_records(recs, 0.2, 0.2, 1))
    again = apply_split_names(recs, names)
    assert split_names(again) == names
    with pytest.raises(ConfigError, match="no longer provides"):
        apply_split_names(recs[:5], names)


@pytest.mark.parametrize(("n", "val", "test", "message"), [(2, 0.2, 0.2, "cannot be split"), (10, 0.5, 0.5, "leaves no images"), (10, -0.1, 0.2, "must be in")])
def test_impossible_splits(n, val, test, message):
    with pytest.raises(ConfigError, match=message):
        split_records(records(n), val, test, 0)
