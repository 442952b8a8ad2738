"""Polygon geometry against brute-force fan clipping, rasters and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bioflow.stardist.polygons import (
    intersection_areas,
    intersection_exceeds,
    polygon_areas,
    polygon_intersection_areas,
    polygon_table,
    polygon_vertices,
    polygons_to_labels,
)


def random_pairs(n_pairs: int, n_rays: int, seed: int) -> tuple[np.ndarray, ...]:
    """Random star-convex pairs: some far apart, some close, some with zero-length rays."""
    rng = np.random.default_rng(seed)
    point_a = rng.uniform(0, 20, (n_pairs, 2))
    point_b = point_a + rng.normal(0, rng.choice([0.3, 3.0, 8.0], size=(n_pairs, 1)), (n_pairs, 2))
    dists_a = rng.uniform(1, 9, (n_pairs, n_rays))
    dists_b = rng.uniform(1, 9, (n_pairs, n_rays))
    dists_b[rng.random((n_pairs, n_rays)) < 0.1] = 0.0
    return point_a, dists_a, point_b, dists_b


def test_vertices_and_areas(geometry) -> None:
    rng = np.random.default_rng(0)
    points, dists = rng.uniform(-5, 5, (6, 2)), rng.uniform(0, 4, (6, 9))
    vertices = polygon_vertices(points, dists)
    for point, dist, verts in zip(points, dists, vertices):
        np.testing.assert_allclose(verts, geometry.star_vertices(point, dist))
        y, x = verts[:, 0], verts[:, 1]
        shoelace = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        assert polygon_areas(dist[None])[0] == pytest.approx(shoelace)
    # Vertex 0 points along +x, vertex R/4 along +y (down the rows).
    diamond = polygon_vertices(np.zeros((1, 2)), np.full((1, 4), 2.0))[0]
    np.testing.assert_allclose(diamond, [[0, 2], [2, 0], [0, -2], [-2, 0]], atol=1e-12)


@pytest.mark.parametrize("n_rays", [5, 8, 16, 32])
def test_intersection_matches_fan_clipping(geometry, n_rays: int) -> None:
    pa, da, pb, db = random_pairs(40, n_rays, seed=n_rays)
    areas = polygon_intersection_areas(pa, da, pb, db)
    expected = [geometry.fan_intersection_area(*args) for args in zip(pa, da, pb, db)]
    np.testing.assert_allclose(areas, expected, rtol=1e-9, atol=1e-9)
    # Symmetric in the two polygons.
    np.testing.assert_allclose(polygon_intersection_areas(pb, db, pa, da), areas, rtol=1e-9, atol=1e-9)


def test_intersection_matches_raster(geometry) -> None:
    pa, da, pb, db = random_pairs(6, 16, seed=99)
    areas = polygon_intersection_areas(pa, da, pb, db)
    for area, args in zip(areas, zip(pa, da, pb, db)):
        va, vb = geometry.star_vertices(args[0], args[1]), geometry.star_vertices(args[2], args[3])
        lo = np.minimum(va.min(0), vb.min(0))
        hi = np.maximum(va.max(0), vb.max(0))
        n = 1200
        ys = lo[0] + (np.arange(n) + 0.5) * (hi[0] - lo[0]) / n
        xs = lo[1] + (np.arange(n) + 0.5) * (hi[1] - lo[1]) / n
        y, x = np.meshgrid(ys, xs, indexing="ij")
        cell = (hi[0] - lo[0]) * (hi[1] - lo[1]) / n**2
        raster = (geometry.even_odd_inside(va, y, x) & geometry.even_odd_inside(vb, y, x)).sum() * cell
        # Only cells on the two boundaries can be misclassified.
        perimeter = sum(np.linalg.norm(np.roll(v, -1, 0) - v, axis=1).sum() for v in (va, vb))
        assert abs(area - raster) <= 0.25 * perimeter * math.sqrt(cell) + 1e-9


def test_intersection_hand_cases() -> None:
    diamond = np.full((1, 4), 2.0)  # |x| + |y| <= 2, area 8
    origin = np.zeros((1, 2))

    def area(pb: list[float], da: np.ndarray = diamond, db: np.ndarray = diamond) -> float:
        return float(polygon_intersection_areas(origin, da, np.array([pb]), db)[0])

    assert area([0, 0]) == pytest.approx(8.0)  # identical
    assert area([0, 2]) == pytest.approx(2.0)  # shifted by a half diagonal: a diamond of half-diagonals 1
    assert area([0, 4]) == pytest.approx(0.0, abs=1e-12)  # touching at a vertex
    assert area([0, 9]) == 0.0  # disjoint
    assert area([2, 2]) == pytest.approx(0.0, abs=1e-12)  # sharing an edge from outside
    # Shifted by half an edge along an edge: a rectangle of sides sqrt(8) and sqrt(8) / 2.
    assert area([1, -1]) == pytest.approx(4.0)
    assert area([0, 0.5], db=diamond * 0.25) == pytest.approx(0.5)  # inside: the small one's area
    rng = np.random.default_rng(5)
    dists = rng.uniform(1, 5, (1, 16))
    same = polygon_intersection_areas(origin, dists, origin, dists)[0]
    assert same == pytest.approx(polygon_areas(dists)[0], rel=1e-12)


def test_intersection_keeps_input_kind() -> None:
    pa, da, pb, db = (torch.from_numpy(a) for a in random_pairs(3, 8, seed=1))
    result = polygon_intersection_areas(pa, da, pb, db)
    assert isinstance(result, torch.Tensor) and result.shape == (3,)
    assert polygon_intersection_areas(pa[:0], da[:0], pb[:0], db[:0]).shape == (0,)


def test_rendering_matches_point_in_polygon(geometry) -> None:
    rng = np.random.default_rng(2)
    for _ in range(8):
        point = rng.uniform(5, 25, 2)
        dists = rng.uniform(0.5, 9, rng.integers(4, 33))
        labels = polygons_to_labels(point[None], dists[None], np.ones(1), (30, 30))
        y, x = np.mgrid[:30, :30].astype(float)
        vertices = geometry.star_vertices(point, dists)
        expected = geometry.even_odd_inside(vertices, y, x)
        clear = geometry.distance_to_boundary(vertices, y, x) > 1e-6
        np.testing.assert_array_equal((labels == 1)[clear], expected[clear])
        assert labels.dtype == np.int32 and set(np.unique(labels)) <= {0, 1}


def test_rendering_by_strips_equals_the_whole_image() -> None:
    rng = np.random.default_rng(5)
    points = rng.uniform(2, 38, (15, 2))
    dists = rng.uniform(2, 8, (15, 16))
    probs = rng.uniform(0.3, 1.0, 15)
    whole = polygons_to_labels(points, dists, probs, (40, 37))
    assert len(np.unique(whole)) > 8
    strips = [polygons_to_labels(points, dists, probs, (40, 37), rows) for rows in ((0, 13), (13, 14), (14, 40))]
    np.testing.assert_array_equal(np.concatenate(strips), whole)
    with pytest.raises(ValueError, match="range to render"):
        polygons_to_labels(points, dists, probs, (40, 37), (-1, 3))


def test_rendering_degenerate_triangles(geometry) -> None:
    # Zero-length rays: the triangles next to them are segments, which must not reach beyond
    # their vertex along the ray.
    dists = np.array([4.0, 0.0, 0.0, 3.0, 0.0, 2.0, 2.0, 0.0])
    labels = polygons_to_labels(np.array([[10.0, 10.0]]), dists[None], np.ones(1), (21, 21))
    y, x = np.mgrid[:21, :21].astype(float)
    vertices = geometry.star_vertices(np.array([10.0, 10.0]), dists)
    clear = geometry.distance_to_boundary(vertices, y, x) > 1e-6
    np.testing.assert_array_equal((labels == 1)[clear], geometry.even_odd_inside(vertices, y, x)[clear])
    assert labels[10, 14] == 1 and labels[10, 15] == 0  # along ray 0, up to its vertex at x = 14
    assert labels[10, 7] == 0  # along ray 4, which has length zero
    assert not polygons_to_labels(np.array([[5.0, 5.0]]), np.zeros((1, 8)), np.ones(1), (9, 9)).any()


def test_rendering_order_and_labels() -> None:
    points = np.array([[10.0, 10.0], [10.0, 13.0], [30.0, 30.0], [30.0, 30.0]])
    dists = np.full((4, 4), 4.0)
    probs = np.array([0.6, 0.9, 0.7, 0.7])
    labels = polygons_to_labels(points, dists, probs, (40, 40))
    # Ranks by decreasing probability, ties by index: 1 -> 1, 2 -> 2, 3 -> 3, 0 -> 4.
    assert labels[10, 13] == 1 and labels[10, 7] == 4
    assert labels[10, 11] == 1  # overlap goes to the higher probability
    assert labels[30, 30] == 2  # identical polygons: the earlier index wins the tie
    assert set(np.unique(labels)) == {0, 1, 2, 4}
    # Closed polygons: the diamond |dy| + |dx| <= 4 contains its boundary pixel centres.
    assert labels[10, 17] == 1 and labels[14, 13] == 1 and labels[10, 18] == 0
    assert polygons_to_labels(points[:0], dists[:0], probs[:0], (5, 5)).sum() == 0
    # Polygons reaching outside the image are clipped.
    border = polygons_to_labels(np.array([[0.0, 0.0]]), np.full((1, 8), 3.0), np.ones(1), (6, 6))
    assert border[0, 0] == 1 and border[2, 2] == 1 and border[5, 5] == 0


def test_degenerate_configurations(geometry) -> None:
    # Zero-length rays make edges run along rays; centres on those lines see them edge-on;
    # shared vertices and edges; nested and identical polygons.
    spiky = np.array([3.0, 0, 3, 0, 3, 0, 3, 0])
    round8 = np.full(8, 2.0)
    cases = [
        ((0, 0), spiky, (0, 5), round8),
        ((0, 0), spiky, (0, 3), spiky),
        ((0, 0), spiky, (0, 0), spiky[::-1].copy()),
        ((0, 0), round8, (0, 4), round8),
        ((0, 0), round8, (0, 0), round8 * 0.5),
        ((1, 1), spiky, (1, 1), round8),
        ((0, 0), np.zeros(8), (0, 0), round8),
        ((0, 0), np.array([2.0, 2, 0, 0, 0, 0, 0, 0]), (0, 1), round8),
    ]
    for pa, da, pb, db in cases:
        pa, pb = np.array(pa, float), np.array(pb, float)
        expected = geometry.fan_intersection_area(pa, da, pb, db)
        result = polygon_intersection_areas(pa[None], da[None], pb[None], db[None])[0]
        assert result == pytest.approx(expected, abs=1e-9), (pa, da, pb, db)


def test_exceeds_agrees_with_areas() -> None:
    pa, da, pb, db = random_pairs(300, 16, seed=8)
    centres = torch.from_numpy(np.concatenate([pa, pb]))
    table = polygon_table(torch.from_numpy(np.concatenate([da, db])))
    first = torch.arange(300)
    areas = intersection_areas(centres, table, first, first + 300)
    for factor in (0.999, 1.001):
        limits = areas * factor
        exceeds = intersection_exceeds(centres, table, first, first + 300, limits)
        torch.testing.assert_close(exceeds, areas > limits)
