"""3D non-maximum suppression against a sequential loop, hand cases, exact targets and the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
from bioflow.metrics.matching import match_instances
from bioflow.stardist import nms3d
from bioflow.stardist.nms3d import instances_from_prediction_3d, non_maximum_suppression_3d
from bioflow.stardist.polyhedra import intersection_volumes, polyhedra_to_labels, polyhedron_volumes
from bioflow.stardist.rays3d import golden_spiral_rays
from bioflow.stardist.targets3d import object_probabilities_3d, star_distances_3d
from tests.stardist.reference import run_reference
from tests.stardist.test_nms import reference_nms

RAYS = golden_spiral_rays(32, (2, 1, 1))


def random_candidates(n_objects: int, per_object: int, seed: int, rays=RAYS):
    """Clusters of jittered ellipsoids around random centres (z extent half the xy extent)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform([0, 0, 0], [15, 40, 40], (n_objects, 3))
    u = rays.vertices.astype(np.float64)
    axes = rng.uniform([2, 4, 4], [4, 8, 8], (n_objects, 3))
    shapes = 1 / np.sqrt(((u[None] / axes[:, None]) ** 2).sum(axis=2))
    owner = rng.integers(0, n_objects, n_objects * per_object)
    points = centres[owner] + rng.normal(0, 1.5, (owner.size, 3)) * [0.5, 1, 1]
    dists = shapes[owner] * rng.uniform(0.8, 1.2, (owner.size, len(rays)))
    probs = rng.permutation(owner.size) / owner.size  # no ties
    return points, dists, probs


def overlap_matrix(points, dists, criterion: str, samples: int = 128) -> np.ndarray:
    n = len(points)
    first, second = np.triu_indices(n, 1)
    reach = dists.max(axis=1)
    near = np.linalg.norm(points[first] - points[second], axis=1) < reach[first] + reach[second]
    first, second = first[near], second[near]
    inter = intersection_volumes(points[first], dists[first], points[second], dists[second], RAYS, samples=samples)
    volumes = polyhedron_volumes(dists, RAYS)
    if criterion == "min_area":
        values = inter / np.minimum(volumes[first], volumes[second])
    else:
        values = inter / (volumes[first] + volumes[second] - inter)
    overlap = np.zeros((n, n))
    overlap[first, second] = overlap[second, first] = values
    return overlap


@pytest.mark.parametrize("criterion", ["min_area", "iou"])
@pytest.mark.parametrize("seed", range(3))
def test_matches_sequential_loop(criterion: str, seed: int, monkeypatch) -> None:
    # Small blocks, so that most candidates meet polyhedra kept in earlier blocks.
    monkeypatch.setattr(nms3d, "_MIN_BLOCK", 8)
    monkeypatch.setattr(nms3d, "_MAX_BLOCK", 32)
    points, dists, probs = random_candidates(6, 10, seed)
    overlap = overlap_matrix(points, dists, criterion)
    # A threshold that no overlap comes close to (closer calls depend on the estimate's error).
    nms_thresh = next(t for t in np.arange(0.2, 0.8, 0.0013) + 0.1 * seed if np.abs(overlap - t).min() > 1e-3)
    expected = reference_nms(probs, overlap, 0.1, nms_thresh)
    kept = non_maximum_suppression_3d(points, dists, probs, RAYS, prob_thresh=0.1, nms_thresh=nms_thresh, criterion=criterion)
    assert kept.dtype == np.int64 and 3 < len(kept) < len(points)
    assert kept.tolist() == expected


def box(centre, half: float = 2.0, rays=RAYS):
    """Distances of the cube |z|, |y|, |x| <= half (exact along every ray, as the cube is convex
    and its corners are not on the rays: the polyhedron is inscribed in it)."""
    u = rays.vertices.astype(np.float64)
    return np.array(centre, float), half / np.abs(u).max(axis=1)


def run(polys, probs, **kwargs) -> list[int]:
    points = np.stack([p for p, _ in polys])
    dists = np.stack([d for _, d in polys])
    return non_maximum_suppression_3d(points, dists, np.array(probs), RAYS, **kwargs).tolist()


def test_hand_cases() -> None:
    # Two equal cube-like polyhedra shifted by half their width along x overlap by about one half.
    pair = [box((5, 5, 5), 3.0), box((5, 5, 8), 3.0)]
    assert run(pair, [0.9, 0.8], nms_thresh=0.6) == [0, 1]
    assert run(pair, [0.9, 0.8], nms_thresh=0.3) == [0]
    assert run(pair, [0.5, 0.9], prob_thresh=0.5, nms_thresh=0.3) == [1]  # the threshold is strict
    # Only kept polyhedra suppress: A suppresses B, B would suppress C, C hardly overlaps A.
    chain = [box((5, 5, 5), 3.0), box((5, 5, 7), 3.0), box((5, 5, 10.5), 3.0)]
    assert run(chain, [0.9, 0.8, 0.7], nms_thresh=0.3) == [0, 2]
    # A small polyhedron inside a big one: fully covered (min_area 1) but with a small IoU.
    nested = [box((5, 5, 5), 4.0), box((5, 5, 5.5), 1.5)]
    assert run(nested, [0.9, 0.8], nms_thresh=0.5, criterion="min_area") == [0]
    assert run(nested, [0.9, 0.8], nms_thresh=0.5, criterion="iou") == [0, 1]
    # Ties: lower index first; empty input; errors.
    same = [box((5, 5, 5)), box((5, 5, 5)), box((5, 5, 5.2))]
    assert run(same, [0.7, 0.7, 0.7]) == [0]
    empty = non_maximum_suppression_3d(np.zeros((0, 3)), np.zeros((0, 32)), np.zeros(0), RAYS)
    assert empty.shape == (0,) and empty.dtype == np.int64
    with pytest.raises(ValueError):
        run(nested, [0.9, 0.8], criterion="volume")
    with pytest.raises(ValueError):
        non_maximum_suppression_3d(np.zeros((2, 3)), np.zeros((2, 31)), np.zeros(2), RAYS)


def test_permutation_and_tensors() -> None:
    points, dists, probs = random_candidates(6, 15, seed=5)
    first = non_maximum_suppression_3d(points, dists, probs, RAYS)
    perm = np.random.default_rng(0).permutation(len(probs))
    np.testing.assert_array_equal(perm[non_maximum_suppression_3d(points[perm], dists[perm], probs[perm], RAYS)], first)
    kept = non_maximum_suppression_3d(*(torch.from_numpy(a) for a in (points, dists, probs)), RAYS)
    assert isinstance(kept, torch.Tensor) and kept.tolist() == first.tolist()


def scene(seed: int = 0, shape=(16, 48, 48)) -> np.ndarray:
    _, labels = synthetic_nuclei_image(shape, seed=seed, n_nuclei=30, radius=(5.0, 8.0), anisotropy=2.0, overlap=0.1)
    return labels


def test_exact_targets_give_the_labels_back() -> None:
    labels = scene()
    rays = golden_spiral_rays(64, (2, 1, 1))
    for grid in ((1, 2, 2), (2, 2, 2)):
        prob = object_probabilities_3d(labels, grid, (2, 1, 1))
        dists = star_distances_3d(labels, rays, grid)
        result, details = instances_from_prediction_3d(prob, dists, rays, grid=grid, shape=labels.shape)
        assert result.shape == labels.shape and result.dtype == np.int32
        assert match_instances(labels, result, 0.5)[0.5].accuracy >= 0.95
        assert np.all(np.diff(details["probs"]) <= 0) and details["points"].shape[1] == 3


def test_same_as_reference() -> None:
    labels = scene(seed=1)
    rays = golden_spiral_rays(64, (2, 1, 1))
    rng = np.random.default_rng(0)
    prob = object_probabilities_3d(labels, (1, 2, 2), (2, 1, 1))
    prob = np.clip(prob + rng.normal(0, 0.02, prob.shape), 0, 1) + rng.uniform(0, 1e-5, prob.shape)  # tie-free
    dists = star_distances_3d(labels, rays, (1, 2, 2)) * (1 + rng.normal(0, 0.03, (*prob.shape, 64)))
    where = np.nonzero(prob > 0.5)
    points = (np.stack(where, axis=1) * [1, 2, 2]).astype(np.float32)
    probs, dists = prob[where].astype(np.float32), np.maximum(dists[where], 1e-3).astype(np.float32)
    out = run_reference(
        """
        from stardist.geometry import polyhedron_to_label
        from stardist.nms import non_maximum_suppression_3d_sparse
        from stardist.rays3d import Rays_GoldenSpiral
        rays = Rays_GoldenSpiral(64, anisotropy=(2, 1, 1))
        p, prob, d, kept = non_maximum_suppression_3d_sparse(
            inputs["dists"], inputs["probs"], inputs["points"], rays, nms_thresh=0.4)
        outputs["kept"] = kept
        outputs["labels"] = polyhedron_to_label(d, p, rays, (16, 48, 48), prob=prob, verbose=False)
        """,
        points=points, dists=dists, probs=probs,
    )
    kept = non_maximum_suppression_3d(points, dists, probs, rays, prob_thresh=0.5, nms_thresh=0.4)
    assert set(kept.tolist()) == set(out["kept"].tolist())
    labels = polyhedra_to_labels(points[kept], dists[kept], probs[kept], (16, 48, 48), rays)
    assert match_instances(out["labels"].astype(np.int64), labels, 0.9)[0.9].f1 >= 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    points, dists, probs = random_candidates(8, 20, seed=7)
    cpu = non_maximum_suppression_3d(points, dists, probs, RAYS)
    gpu = non_maximum_suppression_3d(*(torch.from_numpy(a).cuda() for a in (points, dists, probs)), RAYS)
    assert gpu.device.type == "cuda" and gpu.cpu().tolist() == cpu.tolist()
    labels = polyhedra_to_labels(torch.from_numpy(points[cpu]).cuda(), torch.from_numpy(dists[cpu]).cuda(),
                                 torch.from_numpy(probs[cpu]).cuda(), (20, 50, 50), RAYS)
    np.testing.assert_array_equal(labels.cpu().numpy(), polyhedra_to_labels(points[cpu], dists[cpu], probs[cpu], (20, 50, 50), RAYS))
