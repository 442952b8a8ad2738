"""Augmentation is label-safe, channel-aware and seeded."""

from __future__ import annotations

import numpy as np
import pytest

from bioflow.data.augment import Augmenter
from bioflow.errors import ConfigError

GEOMETRIC = {"HorizontalFlip": {"p": 0.5}, "VerticalFlip": {"p": 0.5}, "RandomRotate90": {"p": 1.0}, "Affine": {"rotate": (-30, 30), "p": 1.0}}


def test_int32_labels_above_65535_survive_warping():
    labels = np.zeros((64, 64), dtype=np.int64)
    labels[10:30, 10:30] = 70000
    labels[35:60, 30:50] = 123456
    image = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
    for seed in range(5):
        _, out = Augmenter(GEOMETRIC, 2, "mask")(image, labels, seed)
        assert set(np.unique(out)) <= {0, 70000, 123456}


def test_channel_first_images_keep_their_channels():
    rng = np.random.default_rng(1)
    image = rng.random((3, 40, 48)).astype(np.float32)
    out, _ = Augmenter({"HorizontalFlip": {"p": 1.0}}, 2, "mask")(image, np.zeros((40, 48)), 0)
    assert out.shape == (3, 40, 48)
    assert np.allclose(out, image[:, :, ::-1])


def test_image_targets_get_the_same_geometry():
    rng = np.random.default_rng(2)
    image = rng.random((1, 32, 32)).astype(np.float32)
    target = image * 2.0
    for seed in range(4):
        a, b = Augmenter(GEOMETRIC, 2, "image")(image, target, seed)
        assert np.allclose(b, 2.0 * a, atol=1e-5)


def test_seeded():
    image = np.random.default_rng(3).random((1, 32, 32)).astype(np.float32)
    aug = Augmenter(GEOMETRIC, 2)
    a, _ = aug(image, None, 5)
    b, _ = aug(image, None, 5)
    assert np.array_equal(a, b)


def test_3d_volumes():
    vol = np.random.default_rng(4).random((2, 8, 16, 16)).astype(np.float32)
    labels = np.arange(8 * 16 * 16).reshape(8, 16, 16)
    out, lab = Augmenter({"HorizontalFlip": {"p": 1.0}}, 3)(vol, labels, 0)
    assert out.shape == vol.shape and np.allclose(out, vol[..., ::-1])
    assert np.array_equal(lab, labels[..., ::-1])


def test_null_switches_a_transform_off():
    assert Augmenter({"HorizontalFlip": None}, 2).pipeline is None


def test_config_errors():
    with pytest.raises(ConfigError, match=r"data\.augment\.HorizontalFlipp: unknown albumentations transform .*did you mean 'HorizontalFlip'"):
        Augmenter({"HorizontalFlipp": {"p": 0.5}}, 2)
    with pytest.raises(ConfigError, match=r"data\.augment\.HorizontalFlip\.q: "):
        Augmenter({"HorizontalFlip": {"q": 0.5}}, 2)
    with pytest.raises(ConfigError, match="restoration target"):
        Augmenter({"GaussNoise": {}}, 2, "image")


@pytest.mark.parametrize("dims", [2, 3])
def test_quarter_turns_keep_a_patch_that_is_not_square_in_plane_its_shape(dims):
    """Patches of one batch must stack: a turn of a 32x64 patch is turned into a flip, not a 64x32 patch."""
    shape = (8,) * (dims - 2) + (32, 64)
    rng = np.random.default_rng(0)
    image = rng.random((1, *shape)).astype(np.float32)
    mask = (image[0] > 0.5).astype(np.int32)
    turn = Augmenter({"RandomRotate90": {"p": 1.0}}, dims, "mask")
    changed = 0
    for seed in range(12):
        out, labels = turn(image, mask, seed)
        assert out.shape == image.shape and labels.shape == mask.shape
        assert np.array_equal(out[0] > 0.5, labels > 0)  # image and mask moved together
        changed += not np.array_equal(out, image)
    assert changed  # the augmentation still does something
    pairs = Augmenter({"RandomRotate90": {"p": 1.0}}, dims, "image")
    out, target = pairs(image, 2 * image, 3)
    assert out.shape == image.shape and np.allclose(target, 2 * out)
