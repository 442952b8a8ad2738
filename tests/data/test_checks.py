"""Data checks before training: shapes, NaN/Inf, empty masks; object size versus receptive field."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bioflow.data.objects import object_extents, object_size_summary
from bioflow.data.records import ImageRecord, check_records
from bioflow.errors import DataError


def rec(name="a", image=None, target=None):
    image = np.ones((1, 16, 16), np.float32) if image is None else image
    target = np.ones((16, 16), np.int32) if target is None else target
    return ImageRecord(name=name, image=image, target=target, source=f"/data/{name}.tif")


def test_shape_mismatch_names_the_file():
    with pytest.raises(DataError, match=r"/data/a.tif: image has spatial shape \(16, 16\) but its target has shape \(16, 15\)"):
        check_records([rec(target=np.ones((16, 15), np.int32))], needs_target=True)


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (np.inf, "infinite")])
def test_non_finite_pixels(value, word):
    image = np.ones((1, 16, 16), np.float32)
    image[0, 3, 3] = value
    with pytest.raises(DataError, match=f"/data/a.tif: the image has {word} pixel values"):
        check_records([rec(image=image)], needs_target=True)


def test_empty_mask_is_an_error_or_a_warning(caplog):
    empty = rec(target=np.zeros((16, 16), np.int32))
    with pytest.raises(DataError, match="the mask is all zero"):
        check_records([empty], needs_target=True)
    with caplog.at_level(logging.WARNING):
        check_records([empty], needs_target=True, allow_empty_targets=True)
    assert "all zero" in caplog.text


def test_missing_target_duplicate_names_and_mixed_channels():
    with pytest.raises(DataError, match="no target"):
        check_records([ImageRecord("a", np.ones((1, 4, 4)))], needs_target=True)
    with pytest.raises(DataError, match="occurs twice"):
        check_records([rec("a"), rec("a")], needs_target=True)
    with pytest.raises(DataError, match="different channel counts"):
        check_records([rec("a"), rec("b", image=np.ones((2, 16, 16), np.float32))], needs_target=True)


def test_object_extents_by_hand():
    mask = np.zeros((20, 20), np.int32)
    mask[0:3, 0:5] = 7      # 3 x 5
    mask[3:13, 0:2] = 9     # touches object 7: 10 x 2
    mask[15:17, 15:20] = 7  # a second region of label 7: as instances it widens label 7's box
    assert sorted(object_extents(mask, instances=True).tolist()) == [10, 20]
    classes = (mask > 0).astype(np.int32)
    assert sorted(object_extents(classes, instances=False).tolist()) == [5, 13]


def test_summary_over_records():
    a = np.zeros((30, 30), np.int32)
    a[0:4, 0:4] = 1
    a[10:20, 10:16] = 2
    summary = object_size_summary([rec(target=a, image=np.ones((1, 30, 30)))], instances=True)
    assert summary == {"median": 7.0, "p90": pytest.approx(9.4), "count": 2}


@pytest.mark.parametrize("foreground", [1, 255])
def test_a_binary_mask_counts_its_connected_objects_not_its_one_value(foreground):
    """A U-Net's 0/1 or 0/255 mask of many small nuclei: objects of their own size, not one object
    spanning the image (which made every run warn about the receptive field)."""
    mask = np.zeros((128, 128), np.uint8)
    for y in range(8, 128, 30):
        for x in range(8, 128, 30):
            mask[y:y + 12, x:x + 12] = foreground
    extents = object_extents(mask, instances=True)
    assert extents.tolist() == [12] * 16
    summary = object_size_summary([rec(target=mask, image=np.ones((1, 128, 128)))], instances=True)
    assert summary["median"] == 12 and summary["count"] == 16
