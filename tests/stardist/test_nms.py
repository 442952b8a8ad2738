"""Non-maximum suppression against a sequential reference loop, hand cases and exact targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.metrics.matching import match_instances
from bioflow.stardist import nms as nms_module
from bioflow.stardist.nms import instances_from_prediction, non_maximum_suppression
from bioflow.stardist.polygons import polygon_areas, polygon_intersection_areas
from bioflow.stardist.targets import object_probabilities, star_distances


def overlap_matrix(points: np.ndarray, dists: np.ndarray, criterion: str) -> np.ndarray:
    """Overlap of every pair of polygons (exact areas, float64; 0 if the bounding circles miss)."""
    n = len(points)
    first, second = np.triu_indices(n, 1)
    reach = dists.max(axis=1)
    near = np.linalg.norm(points[first] - points[second], axis=1) < reach[first] + reach[second]
    first, second = first[near], second[near]
    inter = polygon_intersection_areas(points[first], dists[first], points[second], dists[second])
    areas = polygon_areas(dists)
    if criterion == "min_area":
        values = inter / np.minimum(areas[first], areas[second])
    else:
        values = inter / (areas[first] + areas[second] - inter)
    overlap = np.zeros((n, n))
    overlap[first, second] = overlap[second, first] = np.nan_to_num(values)
    return overlap


def reference_nms(probs: np.ndarray, overlap: np.ndarray, prob_thresh: float, nms_thresh: float) -> list[int]:
    """The greedy loop, one candidate at a time, in order of decreasing probability."""
    order = [i for i in sorted(range(len(probs)), key=lambda i: (-probs[i], i)) if probs[i] > prob_thresh]
    kept: list[int] = []
    for i in order:
        if not (overlap[i, kept] > nms_thresh).any():
            kept.append(i)
    return kept


def random_candidates(n_objects: int, per_object: int, seed: int, n_rays: int = 16):
    """Clusters of jittered star polygons around random object centres."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 80, (n_objects, 2))
    shapes = rng.uniform(3, 10, (n_objects, n_rays))
    owner = rng.integers(0, n_objects, n_objects * per_object)
    points = centres[owner] + rng.normal(0, 2.5, (owner.size, 2))
    dists = np.clip(shapes[owner] * rng.uniform(0.7, 1.3, (owner.size, n_rays)), 0, None)
    dists[rng.random(dists.shape) < 0.03] = 0.0
    probs = rng.uniform(0, 1, owner.size)
    return points, dists, probs


@pytest.mark.parametrize("criterion", ["min_area", "iou"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("small_blocks", [False, True])
def test_matches_sequential_loop(criterion: str, seed: int, small_blocks: bool, monkeypatch) -> None:
    if small_blocks:
        # Many small blocks, so that most candidates meet polygons kept in earlier blocks.
        monkeypatch.setattr(nms_module, "_MIN_BLOCK", 8)
        monkeypatch.setattr(nms_module, "_MAX_BLOCK", 32)
    points, dists, probs = random_candidates(12, 30, seed)
    overlap = overlap_matrix(points, dists, criterion)
    # A threshold no overlap comes within 1e-4 of: closer calls depend on float32 rounding.
    nms_thresh = next(
        t for t in np.arange(0.1, 0.9, 0.0011) + 0.2 * (seed % 4) if np.abs(overlap - t).min() > 1e-4
    )
    expected = reference_nms(probs, overlap, 0.2, nms_thresh)
    kept = non_maximum_suppression(
        points, dists, probs, prob_thresh=0.2, nms_thresh=nms_thresh, criterion=criterion
    )
    assert kept.dtype == np.int64
    assert kept.tolist() == expected


def test_exact_targets_give_the_labels_back(ellipse_labels) -> None:
    # Star-convex objects (ellipses that may touch but not overlap).
    labels = ellipse_labels((160, 200), 45, (5, 15), seed=11, overlap=False)
    prob, dists = object_probabilities(labels), star_distances(labels, 32)
    result, details = instances_from_prediction(prob, dists, prob_thresh=0.5, nms_thresh=0.4)
    assert result.shape == labels.shape and result.dtype == np.int32
    assert match_instances(labels, result, 0.5)[0.5].accuracy >= 0.99
    assert len(details["probs"]) == len(np.unique(labels)) - 1
    assert np.all(np.diff(details["probs"]) <= 0)
    # With a prediction grid the polygons are centred on the lattice and drawn at full size.
    coarse, _ = instances_from_prediction(
        object_probabilities(labels, (2, 2)), star_distances(labels, 32, (2, 2)), grid=(2, 2)
    )
    assert coarse.shape == labels.shape
    assert match_instances(labels, coarse, 0.5)[0.5].accuracy >= 0.99


def square(point: tuple[float, float], size: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A diamond |dy| + |dx| <= size (4 rays) at ``point``."""
    return np.array(point, float), np.full(4, size)


def run(polys: list[tuple[np.ndarray, np.ndarray]], probs: list[float], **kwargs) -> list[int]:
    points = np.stack([p for p, _ in polys])
    dists = np.stack([d for _, d in polys])
    return non_maximum_suppression(points, dists, np.array(probs), **kwargs).tolist()


def test_threshold_is_strict_on_both_sides() -> None:
    # Two diamonds of area 8 shifted along x by s overlap (2 - s / 2) ** 2 * 2: s = 2 gives 2 / 8.
    probs = [0.9, 0.8]
    shifted = [square((0, 0)), square((0, 2))]
    assert run(shifted, probs, nms_thresh=0.25 + 1e-3) == [0, 1]
    assert run(shifted, probs, nms_thresh=0.25 - 1e-3) == [0]
    # Probability threshold is strict too.
    assert run(shifted, [0.5, 0.9], prob_thresh=0.5, nms_thresh=0.9) == [1]


def test_only_kept_polygons_suppress() -> None:
    # A suppresses B, B would suppress C, but C hardly overlaps A: C stays.
    chain = [square((0, 0)), square((0, 1)), square((0, 3))]
    assert run(chain, [0.9, 0.8, 0.7], nms_thresh=0.3) == [0, 2]


def test_criteria_differ_for_nested_polygons() -> None:
    nested = [square((0, 0), 4.0), square((0, 0.5), 1.0)]
    assert run(nested, [0.9, 0.8], nms_thresh=0.5, criterion="min_area") == [0]
    assert run(nested, [0.9, 0.8], nms_thresh=0.5, criterion="iou") == [0, 1]
    with pytest.raises(ValueError):
        run(nested, [0.9, 0.8], criterion="area")


def test_ties_empty_single_and_determinism() -> None:
    same = [square((0, 0)), square((0, 0)), square((0, 0.1))]
    assert run(same, [0.7, 0.7, 0.7]) == [0]  # equal probabilities: lowest index first
    assert run(same[:1], [0.7]) == [0]
    assert run(same, [0.1, 0.2, 0.3]) == []
    empty = non_maximum_suppression(np.zeros((0, 2)), np.zeros((0, 8)), np.zeros(0))
    assert empty.shape == (0,) and empty.dtype == np.int64
    points, dists, probs = random_candidates(10, 40, seed=3, n_rays=32)
    first = non_maximum_suppression(points, dists, probs)
    np.testing.assert_array_equal(first, non_maximum_suppression(points, dists, probs))
    # Permuting the candidates (no tied probabilities) permutes the result accordingly.
    perm = np.random.default_rng(0).permutation(len(probs))
    permuted = non_maximum_suppression(points[perm], dists[perm], probs[perm])
    np.testing.assert_array_equal(perm[permuted], first)


def test_tensor_input_stays_tensor() -> None:
    points, dists, probs = (torch.from_numpy(a) for a in random_candidates(5, 20, seed=4))
    kept = non_maximum_suppression(points, dists, probs)
    assert isinstance(kept, torch.Tensor) and kept.dtype == torch.int64
    labels, details = instances_from_prediction(torch.rand(20, 20), torch.rand(20, 20, 8) * 4)
    assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int32
    assert all(isinstance(v, torch.Tensor) for v in details.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_keep_the_same_polygons_as_the_cpu() -> None:
    from bioflow.stardist.polygons import polygons_to_labels

    points, dists, probs = random_candidates(120, 12, seed=5)
    cpu = non_maximum_suppression(torch.as_tensor(points), torch.as_tensor(dists), torch.as_tensor(probs), 0.3, 0.4)
    cuda = non_maximum_suppression(*(torch.as_tensor(a).cuda() for a in (points, dists, probs)), 0.3, 0.4)
    assert cuda.device.type == "cuda" and cuda.cpu().tolist() == cpu.tolist()
    kept = cpu.tolist()
    labels_cpu = polygons_to_labels(torch.as_tensor(points[kept]), torch.as_tensor(dists[kept]), torch.as_tensor(probs[kept]), (200, 200))
    labels_cuda = polygons_to_labels(*(torch.as_tensor(a[kept]).cuda() for a in (points, dists, probs)), (200, 200))
    assert torch.equal(torch.as_tensor(labels_cpu), torch.as_tensor(labels_cuda).cpu())
