"""Star distances and object probabilities against per-pixel reference loops and hand cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from bioflow.stardist.targets import object_probabilities, star_distances, star_distances_batch


def loop_star_distances(labels: np.ndarray, n_rays: int, grid: tuple[int, int] = (1, 1)) -> np.ndarray:
    """The documented walk, pixel by pixel: float32 unit steps, rounding half to even, stop on
    leaving the image or the label, pull back by 1 - 0.5 / max(|dy|, |dx|) of a step."""
    height, width = labels.shape
    gy, gx = grid
    out = np.zeros((-(-height // gy), -(-width // gx), n_rays), np.float32)
    step = np.float32(2 * math.pi / n_rays)
    for i in range(0, height, gy):
        for j in range(0, width, gx):
            value = labels[i, j]
            if value == 0:
                continue
            for k in range(n_rays):
                phi = np.float32(k) * step
                dy, dx = np.float32(math.sin(float(phi))), np.float32(math.cos(float(phi)))
                y = x = np.float32(0.0)
                while True:
                    y, x = np.float32(y + dy), np.float32(x + dx)
                    ii, jj = i + int(np.rint(y)), j + int(np.rint(x))
                    if not (0 <= ii < height and 0 <= jj < width) or labels[ii, jj] != value:
                        back = np.float32(0.5) / max(abs(dy), abs(dx)) - np.float32(1.0)
                        y, x = np.float32(y + back * dy), np.float32(x + back * dx)
                        out[i // gy, j // gx, k] = np.sqrt(np.float32(y * y + x * x))
                        break
    return out


def loop_object_probabilities(labels: np.ndarray) -> np.ndarray:
    """Distance of each object pixel to the nearest pixel of another label (inside the image),
    divided by the object's maximum: brute force over all pixel pairs."""
    coords = np.stack(np.nonzero(np.ones_like(labels, dtype=bool)), axis=1).astype(float)
    flat = labels.ravel()
    prob = np.zeros(labels.size)
    for index in np.flatnonzero(flat):
        other = coords[flat != flat[index]]
        prob[index] = np.sqrt(((other - coords[index]) ** 2).sum(axis=1)).min()
    for value in np.unique(flat[flat > 0]):
        prob[flat == value] /= prob[flat == value].max()
    return prob.reshape(labels.shape).astype(np.float32)


def test_rectangle_by_hand() -> None:
    labels = np.zeros((10, 12), np.int32)
    labels[2:7, 3:10] = 1  # rows 2..6, columns 3..9
    dist = star_distances(labels, n_rays=8)
    # From (4, 5): +x reaches column 10 (outside) at step 5 -> 4 + 0.5; +y row 7 at step 3 -> 2.5;
    # -x column 2 at step 3 -> 2.5; -y row 1 at step 3 -> 2.5.
    assert dist[4, 5, 0] == pytest.approx(4.5)
    assert dist[4, 5, 2] == pytest.approx(2.5)
    assert dist[4, 5, 4] == pytest.approx(2.5)
    assert dist[4, 5, 6] == pytest.approx(2.5)
    # 45 degrees: positions 0.71, 1.41, 2.12, 2.83 round to offsets 1, 1, 2, 3; step 4 lands on
    # row 7, outside, so the distance is 3 + 0.5 / sin(45 deg).
    assert dist[4, 5, 1] == pytest.approx(3 + 0.5 / math.sin(math.pi / 4), abs=1e-5)
    assert (dist[labels == 0] == 0).all()
    assert dist.dtype == np.float32


@pytest.mark.parametrize("n_rays", [32, 12, 7])
@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (2, 1), (1, 3)])
def test_star_distances_match_loop(ellipse_labels, n_rays: int, grid: tuple[int, int]) -> None:
    labels = ellipse_labels((37, 45), 9, (3, 12), seed=n_rays + 10 * grid[0] + grid[1])
    expected = loop_star_distances(labels, n_rays, grid)
    result = star_distances(labels, n_rays=n_rays, grid=grid)
    assert result.shape == expected.shape
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_labels_are_not_merged_or_truncated(ellipse_labels) -> None:
    base = ellipse_labels((30, 40), 6, (4, 12), seed=3)
    # Non-consecutive labels, labels above 65535 and two labels equal modulo 2**16 that touch.
    relabelled = np.zeros_like(base)
    for old, new in zip(range(1, 7), [3, 65536 + 3, 70000, 2**40, 7, 2**40 + 1]):
        relabelled[base == old] = new
    expected = loop_star_distances(relabelled, 16)
    np.testing.assert_allclose(star_distances(relabelled, 16), expected, atol=1e-5)
    np.testing.assert_allclose(star_distances(relabelled, 16), star_distances(base, 16), atol=0)


def test_star_distances_keep_input_kind(ellipse_labels) -> None:
    labels = ellipse_labels((20, 25), 3, (3, 8), seed=4)
    as_tensor = star_distances(torch.from_numpy(labels.astype(np.int32)), 8, grid=(2, 2))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float32
    np.testing.assert_array_equal(as_tensor.numpy(), star_distances(labels, 8, grid=(2, 2)))


def test_star_distances_edge_cases() -> None:
    assert star_distances(np.zeros((5, 6), np.int32), 8).shape == (5, 6, 8)
    assert not star_distances(np.zeros((5, 6), np.int32), 8).any()
    full = np.ones((4, 5), np.int64)
    np.testing.assert_allclose(star_distances(full, 8), loop_star_distances(full, 8), atol=1e-5)
    with pytest.raises(ValueError):
        star_distances(full, 2)
    with pytest.raises(TypeError):
        star_distances(full.astype(float), 8)


def test_object_probabilities_by_hand() -> None:
    square = np.zeros((7, 7), np.int32)
    square[2:5, 2:5] = 4
    expected = np.zeros((7, 7), np.float32)
    expected[2:5, 2:5] = 0.5
    expected[3, 3] = 1.0
    np.testing.assert_allclose(object_probabilities(square), expected)

    # The image border is not background: distances grow towards the left border.
    edge = np.zeros((3, 5), np.int32)
    edge[:, :3] = 1
    np.testing.assert_allclose(object_probabilities(edge)[1], [1.0, 2 / 3, 1 / 3, 0, 0], rtol=1e-6)


def test_object_probabilities_match_brute_force(ellipse_labels) -> None:
    labels = ellipse_labels((24, 30), 6, (3, 9), seed=7) * 1000  # non-consecutive labels
    expected = loop_object_probabilities(labels)
    np.testing.assert_allclose(object_probabilities(labels), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(object_probabilities(labels, grid=(2, 3)), expected[::2, ::3], rtol=1e-6)
    for value in np.unique(labels[labels > 0]):
        assert object_probabilities(labels)[labels == value].max() == pytest.approx(1.0)


def test_object_probabilities_single_object_image() -> None:
    # Only label, no background: treated as surrounded by background.
    full = np.full((5, 7), 9, np.int32)
    expected = ndimage.distance_transform_edt(np.pad(full, 1))[1:-1, 1:-1]
    np.testing.assert_allclose(object_probabilities(full), expected / expected.max(), rtol=1e-6)
    result = object_probabilities(torch.from_numpy(full))
    assert isinstance(result, torch.Tensor) and result.dtype == torch.float32


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (1, 3)])
@pytest.mark.parametrize("width", [40, 37])
def test_batched_star_distances_equal_per_image_loops(ellipse_labels, grid, width) -> None:
    """Objects touching the image border on every side: a batched walk must stop there too."""
    scene = ellipse_labels((90, 80), 30, (4, 14), seed=5)
    images = [scene[r:r + 36, c:c + width] for r, c in ((0, 0), (20, 31), (50, 7))]
    images[1] = np.where(images[1] > 0, images[1] + 70_000, 0)  # large ids stay apart
    batch = star_distances_batch(torch.from_numpy(np.stack(images).astype(np.int64)), 12, grid)
    assert batch.shape == (3, -(-36 // grid[0]), -(-width // grid[1]), 12)
    for image, result in zip(images, batch):
        np.testing.assert_array_equal(result.numpy(), loop_star_distances(image, 12, grid))


def test_the_walk_counts_the_same_steps_on_numpy_arrays_and_on_tensors():
    # On the CPU the walk runs on NumPy views of the masks; other devices walk the tensors.
    from bioflow.stardist.targets import _walk_plan, _walk_steps

    rng = np.random.default_rng(0)
    masks = (rng.random((33, 33, 12)) < 0.85).astype(np.uint8)
    offsets, _, groups = _walk_plan(32, 50, True)
    sizes = sorted(rng.integers(5, 34, 6).tolist(), reverse=True)  # 6 objects, 2 mirrored copies each
    for canonical, _members in groups:
        on_numpy = _walk_steps(masks, sizes, 2, (2, 2), offsets[canonical])
        on_torch = _walk_steps(torch.from_numpy(masks), sizes, 2, (2, 2), offsets[canonical])
        assert isinstance(on_numpy, np.ndarray) and isinstance(on_torch, torch.Tensor)
        np.testing.assert_array_equal(on_numpy, on_torch.numpy())
        assert on_numpy.max() > 1
