"""The synthetic nuclei generator: deterministic, realistic enough, valid labels."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bioflow.data.synthetic_nuclei import synthetic_nuclei_image


def test_deterministic_and_distinct():
    a_img, a_lab = synthetic_nuclei_image((96, 96), seed=1, index=0)
    b_img, b_lab = synthetic_nuclei_image((96, 96), seed=1, index=0)
    c_img, _ = synthetic_nuclei_image((96, 96), seed=1, index=1)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)


def test_labels_are_consecutive_connected_and_some_touch():
    image, labels = synthetic_nuclei_image((256, 256), seed=0, index=3)
    assert image.dtype == np.uint16 and labels.dtype == np.int32
    ids = np.unique(labels[labels > 0])
    assert np.array_equal(ids, np.arange(1, len(ids) + 1)) and len(ids) > 20
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        _, n = ndimage.label(labels[sl] == i)
        assert n == 1, f"nucleus {i} is split in {n} parts"
    # touching neighbours: a foreground pixel next to a different foreground label
    right = (labels[:, :-1] > 0) & (labels[:, 1:] > 0) & (labels[:, :-1] != labels[:, 1:])
    assert right.sum() > 10
    # nuclei are brighter than the background
    assert image[labels > 0].mean() > 2 * image[labels == 0].mean()


def test_3d():
    image, labels = synthetic_nuclei_image((16, 48, 48), seed=0, index=0, anisotropy=2.0)
    assert image.shape == labels.shape == (16, 48, 48)
    assert labels.max() > 3
