"""3D star distances and object probabilities: per-voxel loops, hand cases and the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
from bioflow.stardist.rays3d import golden_spiral_rays
from bioflow.stardist.targets3d import object_probabilities_3d, star_distances_3d, star_distances_3d_batch
from tests.stardist.reference import run_reference


def loop_star_distances(labels: np.ndarray, vertices: np.ndarray, grid=(1, 1, 1)) -> np.ndarray:
    """The documented walk voxel by voxel: float32 unit steps, offsets rounded half to even, stop
    on leaving the volume or the label, distance = length of the rounded offset."""
    shape = labels.shape
    out = np.zeros(tuple(-(-s // g) for s, g in zip(shape, grid)) + (len(vertices),), np.float32)
    for index in np.ndindex(*out.shape[:3]):
        start = np.array(index) * grid
        value = labels[tuple(start)]
        if value == 0:
            continue
        for k, direction in enumerate(vertices.astype(np.float32)):
            position = np.zeros(3, np.float32)
            while True:
                position = (position + direction).astype(np.float32)
                offset = np.rint(position).astype(int)
                voxel = start + offset
                if (voxel < 0).any() or (voxel >= shape).any() or labels[tuple(voxel)] != value:
                    out[index + (k,)] = np.sqrt(np.float32((offset**2).sum()))
                    break
    return out


def small_scene(seed: int = 1, shape=(12, 24, 24)) -> np.ndarray:
    _, labels = synthetic_nuclei_image(
        shape, seed=seed, n_nuclei=int(np.prod(shape)) // 150, radius=(3.0, 6.0), anisotropy=2.0, clustering=0.8
    )
    return labels


def test_box_by_hand() -> None:
    labels = np.zeros((9, 10, 11), np.int32)
    labels[2:7, 3:8, 1:9] = 5  # z 2..6, y 3..7, x 1..8
    rays = golden_spiral_rays(8)
    dist = star_distances_3d(labels, rays)
    assert dist.shape == (9, 10, 11, 8) and dist.dtype == np.float32
    # Ray 0 is -z, ray 7 is +z: from (4, 5, 5) the first voxel outside is z = 1 (3 steps) and z = 7.
    assert dist[4, 5, 5, 0] == 3.0 and dist[4, 5, 5, 7] == 3.0
    assert dist[2, 5, 5, 0] == 1.0 and dist[6, 5, 5, 7] == 1.0
    assert (dist[labels == 0] == 0).all() and (dist[labels > 0] >= 1).all()


@pytest.mark.parametrize("grid", [(1, 1, 1), (1, 2, 2), (2, 2, 1)])
def test_matches_voxel_loop(grid) -> None:
    labels = small_scene(shape=(8, 16, 16))
    rays = golden_spiral_rays(12, (2, 1, 1))
    np.testing.assert_array_equal(star_distances_3d(labels, rays, grid), loop_star_distances(labels, rays.vertices, grid))


def test_sphere_of_known_radius() -> None:
    zz, yy, xx = np.mgrid[:31, :31, :31] - 15
    labels = (zz**2 + yy**2 + xx**2 <= 10.3**2).astype(np.uint8)
    dist = star_distances_3d(labels, golden_spiral_rays(64))
    # From the centre every ray leaves the ball of radius 10.3 between 10.3 and 11.3 (+ rounding).
    centre = dist[15, 15, 15]
    assert centre.min() >= 10.0 and centre.max() <= 11.0 + np.sqrt(3) / 2


def test_grid_large_and_sparse_labels_batch_and_tensors() -> None:
    labels = small_scene()
    rays = golden_spiral_rays(16, (2, 1, 1))
    full = star_distances_3d(labels, rays)
    np.testing.assert_array_equal(star_distances_3d(labels, rays, (2, 2, 2)), full[::2, ::2, ::2])
    # Labels above 65535 and not consecutive: the same as 1..n.
    renamed = np.where(labels > 0, labels * 70001 + 3, 0).astype(np.int64)
    np.testing.assert_array_equal(star_distances_3d(renamed, rays), full)
    other = small_scene(seed=2)
    batch = star_distances_3d_batch(torch.from_numpy(np.stack([labels, other])), rays, (2, 2, 2))
    assert isinstance(batch, torch.Tensor) and batch.shape == (2, 6, 12, 12, 16)
    np.testing.assert_array_equal(batch[0].numpy(), full[::2, ::2, ::2])
    np.testing.assert_array_equal(batch[1].numpy(), star_distances_3d(other, rays, (2, 2, 2)))
    with pytest.raises(ValueError):
        star_distances_3d(labels[0], rays)
    with pytest.raises(ValueError):
        star_distances_3d(labels, rays, (1, 0, 1))
    with pytest.raises(TypeError):
        star_distances_3d(labels.astype(np.float32), rays)


def test_object_probabilities_against_brute_force() -> None:
    labels = small_scene(shape=(8, 14, 14))
    spacing = np.array([2.0, 1.0, 1.0])
    prob = object_probabilities_3d(labels, anisotropy=spacing)
    coords = np.stack(np.nonzero(np.ones(labels.shape, bool)), axis=1)
    flat = labels.ravel()
    expected = np.zeros(labels.size)
    for i in np.flatnonzero(flat):
        other = coords[flat != flat[i]]
        expected[i] = np.sqrt((((other - coords[i]) * spacing) ** 2).sum(axis=1)).min()
    for value in np.unique(flat[flat > 0]):
        expected[flat == value] /= expected[flat == value].max()
    np.testing.assert_allclose(prob, expected.reshape(labels.shape), atol=1e-6)
    np.testing.assert_array_equal(object_probabilities_3d(labels, (2, 1, 2), spacing), prob[::2, :, ::2])
    # A volume that is one object throughout is treated as surrounded by background.
    whole = object_probabilities_3d(np.ones((3, 5, 5), np.int32))
    assert whole[1, 2, 2] == 1.0 and whole[0, 0, 0] == pytest.approx(1 / 2)


def test_same_as_reference() -> None:
    labels = small_scene(seed=3, shape=(16, 40, 40))
    out = run_reference(
        """
        from stardist.geometry import star_dist3D
        from stardist.rays3d import Rays_GoldenSpiral
        from stardist.utils import edt_prob
        rays = Rays_GoldenSpiral(64, anisotropy=(2, 1, 1))
        outputs["dist"] = star_dist3D(inputs["labels"], rays)
        outputs["grid"] = star_dist3D(inputs["labels"], rays, grid=(1, 2, 2))
        outputs["prob"] = edt_prob(inputs["labels"], anisotropy=(2, 1, 1))
        """,
        labels=labels.astype(np.uint16),
    )
    rays = golden_spiral_rays(64, (2, 1, 1))
    interior = ndimage.binary_erosion(labels > 0)
    dist = star_distances_3d(labels, rays)
    assert np.abs(dist - out["dist"])[interior].max() <= 1e-3
    # Only offsets that round differently with and without the start coordinate may differ.
    assert np.mean(dist != out["dist"]) < 1e-3
    assert np.mean(star_distances_3d(labels, rays, (1, 2, 2)) != out["grid"]) < 1e-3
    np.testing.assert_allclose(object_probabilities_3d(labels, anisotropy=(2, 1, 1)), out["prob"], atol=1e-5)
