"""Matching of 3D label volumes: whole volumes (never slices), pooled datasets, the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.metrics.instance import InstanceMatchingMetric
from bioflow.metrics.matching import match_dataset, match_instances
from tests.stardist.reference import run_reference


def tilted_rods() -> tuple[np.ndarray, np.ndarray]:
    """Two rods along z; the prediction of the second is shifted by one voxel in x from z = 2 on.

    Per volume, each predicted rod overlaps its true rod by 16 of 20 voxels or more; slice by
    slice, the shifted slices of the second rod do not match at all."""
    true = np.zeros((8, 6, 10), np.int64)
    true[:, 1:3, 1:3] = 1
    true[:, 3:5, 5:7] = 2
    pred = np.zeros_like(true)
    pred[:, 1:3, 1:3] = 7
    pred[:2, 3:5, 5:7] = 9
    pred[2:, 3:5, 6:8] = 9
    return true, pred


def test_volumes_are_matched_whole() -> None:
    true, pred = tilted_rods()
    # By hand: rod 2 has 32 voxels each, the prediction shares 8 + 6 * 4 = 20 of them.
    iou = 20 / (32 + 32 - 20)
    stats = match_instances(true, pred, (0.3, 0.5))
    assert stats[0.3].tp == 2 and stats[0.3].sum_matched_iou == pytest.approx(1 + iou)
    assert stats[0.5].tp == 1 and stats[0.5].fn == 1 and stats[0.5].fp == 1
    metric = InstanceMatchingMetric((0.3, 0.5), spatial_dims=3)
    metric.update(torch.from_numpy(true), torch.from_numpy(pred))  # one volume
    metric.update(true[None], pred[None])  # a batch of one volume
    result = metric.compute()
    assert float(result["f1@0.3"]) == 1.0 and float(result["f1@0.5"]) == pytest.approx(0.5)
    assert float(result["mean_matched_score@0.3"]) == pytest.approx((1 + iou) / 2)
    # The same volume read as a batch of 2D slices (the old reading) scores differently.
    sliced = InstanceMatchingMetric((0.3, 0.5))
    sliced.update(true, pred)
    assert float(sliced.compute()["f1@0.5"]) == pytest.approx(20 / 32)  # 10 of 16 slices per side
    with pytest.raises(ValueError):
        InstanceMatchingMetric((0.5,), spatial_dims=4)
    with pytest.raises(ValueError):
        metric.update(true[0], pred[0])


def test_pooled_over_volumes() -> None:
    rng = np.random.default_rng(0)
    volumes = []
    for _ in range(3):
        true = np.kron(rng.integers(0, 5, (3, 4, 4)), np.ones((2, 3, 3), np.int64))
        pred = true.copy()
        flip = rng.random(pred.shape) < 0.1
        pred[flip] = rng.integers(0, 6, flip.sum())
        volumes.append((true, pred * 70000))
    expected = match_dataset(volumes, (0.5, 0.7))
    metric = InstanceMatchingMetric((0.5, 0.7), spatial_dims=3)
    metric.update(np.stack([t for t, _ in volumes]), np.stack([p for _, p in volumes]))
    result = metric.compute()
    for tau, stats in expected.items():
        assert float(result[f"accuracy@{tau:g}"]) == pytest.approx(stats.accuracy)
        totals = [match_instances(t, p, tau)[tau] for t, p in volumes]
        assert stats.tp == sum(s.tp for s in totals) and stats.n_true == sum(s.n_true for s in totals)


def test_same_as_reference_matching() -> None:
    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image

    _, true = synthetic_nuclei_image((12, 32, 32), seed=0, n_nuclei=20, radius=(4.0, 7.0), anisotropy=2.0)
    pred = np.roll(true, 1, axis=2)
    pred[:, :, :3] = 0
    out = run_reference(
        """
        from stardist.matching import matching
        for tau in (0.3, 0.5, 0.7):
            m = matching(inputs["true"], inputs["pred"], thresh=tau)
            outputs[str(tau)] = np.array([m.tp, m.fp, m.fn, m.accuracy, m.f1, m.mean_matched_score, m.panoptic_quality])
        """,
        true=true, pred=pred,
    )
    for tau, stats in match_instances(true, pred, (0.3, 0.5, 0.7)).items():
        expected = out[str(tau)]
        got = [stats.tp, stats.fp, stats.fn, stats.accuracy, stats.f1, stats.mean_matched_score, stats.panoptic_quality]
        np.testing.assert_allclose(got, expected, rtol=1e-6)  # the reference sums IoUs in float32
