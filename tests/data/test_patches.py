"""Patch index, patch reading with padding, seeded reproducibility, sampler sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.data.augment import Augmenter
from bioflow.data.normalize import PercentileNorm
from bioflow.data.patches import PatchDataset, PatchIndex, WholeImageDataset
from bioflow.data.records import ImageRecord
from bioflow.losses.segmentation import IGNORE_INDEX
from bioflow.samplers.base import SeededSampler
from bioflow.samplers.uniform import UniformSampler


def make_records():
    rng = np.random.default_rng(0)
    big = ImageRecord("big", rng.random((1, 100, 70)).astype(np.float32), rng.integers(0, 3, (100, 70)))
    small = ImageRecord("small", rng.random((1, 20, 30)).astype(np.float32), rng.integers(0, 3, (20, 30)))
    return [big, small]


def test_candidates_cover_images_and_larger_images_have_more():
    index = PatchIndex(make_records(), (32, 32))
    big = index.starts[index.record_ids == 0]
    assert big[:, 0].min() == 0 and big[:, 0].max() == 100 - 32
    assert big[:, 1].max() == 70 - 32
    assert (index.record_ids == 0).sum() > 10 * (index.record_ids == 1).sum()
    assert (index.record_ids == 1).sum() == 1  # smaller than a patch: one padded candidate


def test_small_image_is_padded_with_ignore_labels():
    recs = make_records()
    index = PatchIndex(recs, (32, 32))
    norms = [PercentileNorm.fit(r.image) for r in recs]
    ds = PatchDataset(index, norms, Augmenter(None, 2), None)
    i = int(np.flatnonzero(index.record_ids == 1)[0])
    sample = ds[(i, 0)]
    assert sample["image"].shape == (1, 32, 32) and sample["target"].shape == (32, 32)
    target = sample["target"].numpy()
    assert (target[20:, :] == IGNORE_INDEX).all() and (target[:, 30:] == IGNORE_INDEX).all()
    assert np.array_equal(target[:20, :30], recs[1].target)


def test_same_seed_same_sample_different_seed_different_sample():
    recs = make_records()
    index = PatchIndex(recs, (32, 32))
    ds = PatchDataset(index, [PercentileNorm.fit(r.image) for r in recs],
                      Augmenter({"HorizontalFlip": {"p": 0.5}, "RandomRotate90": {"p": 0.5}}, 2), None)
    a, b, c = ds[(3, 11)], ds[(3, 11)], ds[(3, 12)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(a["image"], c["image"])


def test_patch_content_matches_its_image():
    recs = make_records()
    index = PatchIndex(recs, (16, 16))
    norm = PercentileNorm.fit(recs[0].image)
    ds = PatchDataset(index, [norm, PercentileNorm.fit(recs[1].image)], Augmenter(None, 2), None)
    sample = ds[(0, 5)]
    image = norm(recs[0].image)[0]
    patch = sample["image"][0].numpy()
    # find where the (jittered) patch came from and check image and target agree there
    hits = [(y, x) for y in range(0, 100 - 15) for x in range(0, 70 - 15) if np.allclose(image[y:y + 16, x:x + 16], patch)]
    assert len(hits) == 1
    y, x = hits[0]
    assert np.array_equal(sample["target"].numpy(), recs[0].target[y:y + 16, x:x + 16])


def test_whole_image_dataset():
    recs = make_records()
    ds = WholeImageDataset(recs, [PercentileNorm.fit(r.image) for r in recs], None)
    assert ds[1]["image"].shape == (1, 20, 30) and ds[1]["target"].dtype == torch.int64


@pytest.mark.parametrize("world", [1, 2, 3])
def test_seeded_sampler_shards_one_draw_over_ranks(world, monkeypatch):
    index = PatchIndex(make_records(), (16, 16))
    full = list(UniformSampler(index, num_samples=10, seed=4))
    shares = []
    for rank in range(world):
        monkeypatch.setattr("bioflow.samplers.base.rank_and_world", lambda r=rank: (r, world))
        sampler = SeededSampler(UniformSampler(index, num_samples=10, seed=4), seed=4)
        shares.append(list(sampler))
        assert len(shares[-1]) == len(sampler) == -(-10 // world)
    pairs = [pair for share in shares for pair in share]
    distinct = set(pairs)
    # one draw of 10 (index, seed) samples split over the ranks; only the wrap-around repeats
    assert len(distinct) == 10
    assert sorted(i for i, _ in distinct) == sorted(full)
    assert len(pairs) - len(distinct) == -(-10 // world) * world - 10


def test_epochs_draw_differently():
    index = PatchIndex(make_records(), (16, 16))
    sampler = UniformSampler(index, num_samples=50, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
