"""Shared helpers for the StarDist tests: synthetic label images and independent geometry."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import pytest
import torch


def make_ellipse_labels(
    shape: tuple[int, int], n_objects: int, radii: tuple[float, float], seed: int, overlap: bool = True
) -> np.ndarray:
    """Random ellipses, labels 1..n in turn. With ``overlap`` later ellipses are painted on the
    background left by earlier ones (objects may be cut, non-convex); without, an ellipse that
    would cover an earlier one is dropped (objects stay whole ellipses and may only touch)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int64)
    label = 0
    for _ in range(n_objects):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        a, b = rng.uniform(*radii, size=2)
        theta = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
        v = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        if not overlap and labels[inside].any():
            continue
        label += 1
        labels[inside & (labels == 0)] = label
    return labels


@pytest.fixture
def ellipse_labels() -> Callable[..., np.ndarray]:
    return make_ellipse_labels


def star_vertices(point: np.ndarray, dists: np.ndarray) -> np.ndarray:
    """(R, 2) vertices (y, x) of one star-convex polygon, rays at 2 pi k / R from +x."""
    phi = 2 * np.pi * np.arange(len(dists)) / len(dists)
    return np.stack([point[0] + dists * np.sin(phi), point[1] + dists * np.cos(phi)], axis=1)


def _clip_convex(subject: list[tuple[float, float]], clip: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sutherland-Hodgman clipping of a polygon by a counter-clockwise convex polygon (x, y)."""
    output = subject
    for (ax, ay), (bx, by) in zip(clip, clip[1:] + clip[:1]):
        if not output:
            break
        source, output = output, []

        def side(point: tuple[float, float]) -> float:
            return (bx - ax) * (point[1] - ay) - (by - ay) * (point[0] - ax)

        for p, q in zip(source, source[1:] + source[:1]):
            sp, sq = side(p), side(q)
            if sp >= 0:
                output.append(p)
            if (sp >= 0) != (sq >= 0):
                t = sp / (sp - sq)
                output.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return output


def _shoelace(polygon: list[tuple[float, float]]) -> float:
    if len(polygon) < 3:
        return 0.0
    x, y = np.array(polygon).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def fan_intersection_area(
    point_a: np.ndarray, dists_a: np.ndarray, point_b: np.ndarray, dists_b: np.ndarray
) -> float:
    """Exact intersection area by brute force: every triangle of a's fan clipped by every triangle
    of b's fan (the fan triangles tile each polygon, and triangles are convex)."""

    def triangles(point: np.ndarray, dists: np.ndarray) -> list[list[tuple[float, float]]]:
        vertices = star_vertices(point, dists)
        centre = (float(point[1]), float(point[0]))
        result = []
        for k in range(len(dists)):
            v, w = vertices[k], vertices[(k + 1) % len(dists)]
            triangle = [centre, (float(v[1]), float(v[0])), (float(w[1]), float(w[0]))]
            if _shoelace(triangle) > 0:
                result.append(triangle)
        return result

    total = 0.0
    for ta in triangles(point_a, dists_a):
        for tb in triangles(point_b, dists_b):
            total += _shoelace(_clip_convex(ta, tb))
    return total


def even_odd_inside(vertices: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Crossing-number point-in-polygon test (vertices (R, 2) as (y, x))."""
    inside = np.zeros(np.broadcast(y, x).shape, dtype=bool)
    for (y0, x0), (y1, x1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_cross)
    return inside


def distance_to_boundary(vertices: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Euclidean distance of points to the polygon's boundary."""
    best = np.full(np.broadcast(y, x).shape, np.inf)
    for (y0, x0), (y1, x1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        dy, dx = y1 - y0, x1 - x0
        length2 = dy * dy + dx * dx
        t = np.clip(((y - y0) * dy + (x - x0) * dx) / length2, 0, 1) if length2 > 0 else np.zeros_like(best)
        best = np.minimum(best, np.hypot(y - (y0 + t * dy), x - (x0 + t * dx)))
    return best


@pytest.fixture
def geometry() -> SimpleNamespace:
    """Independent (slow, simple) geometry used as the reference in the tests."""
    return SimpleNamespace(
        star_vertices=star_vertices,
        fan_intersection_area=fan_intersection_area,
        even_odd_inside=even_odd_inside,
        distance_to_boundary=distance_to_boundary,
    )


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Run on one intra-op thread, as the benchmark does: the geometry issues many small tensor
    operations, and on a busy machine their threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
