"""Splits by image: disjoint, reproducible, independent of listing order, groups kept together."""

from __future__ import annotations

import numpy as np
import pytest

from bioflow.data.records import ImageRecord
from bioflow.data.split import apply_split_names, split_by_region, split_names, split_records
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


def test_listed_splits_by_name_pattern_file_and_folder(tmp_path):
    folder = tmp_path / "fixed_test"
    folder.mkdir()
    recs = records(8)
    recs[6].source = str(folder / "img06.tif")
    recs[7].source = str(tmp_path / "img07.tif")
    splits = split_records(recs, val=["img0[01]"], test=[str(folder), str(tmp_path / "img07.tif")], seed=0)
    names = split_names(splits)
    assert names == {"val": ["img00", "img01"], "test": ["img06", "img07"], "train": ["img02", "img03", "img04", "img05"]}


def test_a_fraction_is_drawn_from_the_images_not_listed():
    recs = records(10)
    splits = split_names(split_records(recs, val=0.25, test=["img09"], seed=1, train=[f"img0{i}" for i in range(9)]))
    assert splits["test"] == ["img09"] and len(splits["val"]) == 2 and len(splits["train"]) == 7
    assert set(splits["val"]) | set(splits["train"]) == {f"img0{i}" for i in range(9)}


@pytest.mark.parametrize(
    ("lists", "message"),
    [
        ({"val": ["nope"], "test": 0.0}, "data.split.val: 'nope' names no image"),
        ({"val": ["img01"], "test": ["img01"]}, "also listed"),
        ({"val": ["img01"], "test": ["img02"], "train": ["img00"]}, "in no split"),
        ({"val": ["img0*"], "test": 0.0}, "no images are left for training"),
    ],
)
def test_bad_split_lists_are_config_errors(lists, message):
    lists = {"test": 0.0, **lists}
    with pytest.raises(ConfigError, match=message):
        split_records(records(4), lists["val"], lists["test"], seed=0, train=lists.get("train"))


def test_region_split_holds_out_the_end_of_each_image_and_is_rebuilt_from_its_names():
    image = np.arange(2 * 100 * 40, dtype=np.float32).reshape(2, 100, 40)
    target = (np.arange(100 * 40) % 7).reshape(100, 40)
    recs = [ImageRecord(name="cells", image=image, target=target, source="cells.tif")]
    splits = split_records(recs, val=0.1, test=0.2, seed=0, by="auto")  # one image: regions
    names = split_names(splits)
    assert names == {"train": ["cells[Y0:70]"], "val": ["cells[Y70:80]"], "test": ["cells[Y80:100]"]}
    val = splits["val"][0]
    np.testing.assert_array_equal(np.asarray(val.image), image[:, 70:80])
    np.testing.assert_array_equal(val.image[1, 2:4, 5], image[1, 72:74, 5])
    np.testing.assert_array_equal(np.asarray(val.target), target[70:80])
    assert val.spatial_shape == (10, 40)
    rebuilt = apply_split_names(recs, names)
    np.testing.assert_array_equal(np.asarray(rebuilt["test"][0].image), image[:, 80:])


def test_auto_split_keeps_whole_images_when_there_are_enough():
    splits = split_names(split_records(records(10), val=0.2, test=0.2, seed=0, by="auto"))
    assert all("[" not in n for names in splits.values() for n in names)
    wide = [ImageRecord(name="w", image=np.zeros((1, 8, 30)))]
    assert split_names(split_by_region(wide, 0.2, 0.0))["val"] == ["w[X24:30]"]
    with pytest.raises(ConfigError, match="too small"):
        split_by_region([ImageRecord(name="tiny", image=np.zeros((1, 2, 2)))], 0.2, 0.2)
