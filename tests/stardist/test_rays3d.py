"""Golden-spiral rays and faces: hand-checked properties and the reference's Rays_GoldenSpiral."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import ConvexHull

from bioflow.stardist.rays3d import golden_spiral_rays, normalize_anisotropy
from tests.stardist.reference import run_reference


@pytest.mark.parametrize("n_rays", [6, 8, 64, 96])
@pytest.mark.parametrize("anisotropy", [None, (2.0, 1.0, 1.0), (5.0, 1.5, 1.0)])
def test_directions_and_faces(n_rays: int, anisotropy) -> None:
    rays = golden_spiral_rays(n_rays, anisotropy)
    u = rays.vertices.astype(np.float64)
    assert rays.vertices.dtype == np.float32 and u.shape == (n_rays, 3) and len(rays) == n_rays
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-6)
    # First and last ray along -z and +z, whatever the anisotropy.
    np.testing.assert_allclose(u[0], [-1, 0, 0], atol=1e-7)
    np.testing.assert_allclose(u[-1], [1, 0, 0], atol=1e-7)
    # A closed triangulation of the sphere (Euler: F = 2 R - 4), every face oriented outwards
    # (negative determinant of its (z, y, x) rows), every edge shared by two faces in opposite
    # directions.
    faces = rays.faces
    assert faces.shape == (2 * n_rays - 4, 3)
    assert (np.linalg.det(u[faces]) < 0).all()
    edges = {(int(a), int(b)) for face in faces for a, b in zip(face, np.roll(face, -1))}
    assert len(edges) == 3 * len(faces) and all((b, a) in edges for a, b in edges)
    # The faces are the hull of the anisotropy-scaled lattice: the polyhedron reaching those
    # points along the rays is that (convex) hull, and its volume from the faces agrees.
    scaled = _lattice(n_rays) / np.array(anisotropy or (1.0, 1.0, 1.0))
    corners = np.linalg.norm(scaled, axis=1)[:, None] * u
    volume = -np.linalg.det(corners[faces]).sum() / 6
    assert volume == pytest.approx(ConvexHull(scaled).volume, rel=1e-6)


def _lattice(n: int) -> np.ndarray:
    """The golden-spiral points on the unit sphere, written out independently."""
    k = np.arange(n)
    z = -1 + 2 * k / (n - 1)
    phi = k * np.pi * (3 - np.sqrt(5))
    return np.stack([z, np.sqrt(1 - z**2) * np.sin(phi), np.sqrt(1 - z**2) * np.cos(phi)], axis=1)


def test_anisotropy_bunches_rays_towards_the_xy_plane() -> None:
    iso, aniso = golden_spiral_rays(64), golden_spiral_rays(64, (4, 1, 1))
    assert np.abs(aniso.vertices[1:-1, 0]).mean() < 0.5 * np.abs(iso.vertices[1:-1, 0]).mean()
    # Directions are those of the isotropic lattice divided by the anisotropy, renormalised.
    scaled = iso.vertices / np.array([4.0, 1.0, 1.0])
    np.testing.assert_allclose(aniso.vertices, scaled / np.linalg.norm(scaled, axis=1, keepdims=True), atol=1e-6)


def test_pixel_size_and_errors() -> None:
    assert normalize_anisotropy(pixel_size=(0.5, 0.25, 0.25)) == (2.0, 1.0, 1.0)
    a, b = golden_spiral_rays(32, pixel_size=(1.0, 0.5, 0.5)), golden_spiral_rays(32, anisotropy=(2, 1, 1))
    np.testing.assert_array_equal(a.vertices, b.vertices)
    assert a.anisotropy == (2.0, 1.0, 1.0)
    for bad in [dict(n_rays=3), dict(anisotropy=(1, 1)), dict(anisotropy=(0, 1, 1)), dict(pixel_size=(1, -1, 1)),
                dict(anisotropy=(1, 1, 1), pixel_size=(1, 1, 1))]:
        with pytest.raises(ValueError):
            golden_spiral_rays(**{"n_rays": 16, **bad})


def test_same_as_reference() -> None:
    out = run_reference(
        """
        from stardist.rays3d import Rays_GoldenSpiral
        for n in (8, 64, 96):
            for name, a in (("iso", None), ("aniso", (2, 1, 1)), ("strong", (5, 1.5, 1))):
                rays = Rays_GoldenSpiral(n, anisotropy=a)
                outputs[f"{n}{name}v"], outputs[f"{n}{name}f"] = rays.vertices, rays.faces
        """
    )
    for n in (8, 64, 96):
        for name, a in (("iso", None), ("aniso", (2, 1, 1)), ("strong", (5, 1.5, 1))):
            rays = golden_spiral_rays(n, a)
            np.testing.assert_array_equal(rays.vertices, out[f"{n}{name}v"])
            np.testing.assert_array_equal(rays.faces, out[f"{n}{name}f"])
