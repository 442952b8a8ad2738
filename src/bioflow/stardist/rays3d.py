"""Ray directions of StarDist 3D: a golden-spiral (Fibonacci) lattice on the sphere and its faces.

Conventions
-----------
Volumes are indexed ``(z, y, x)`` and so are ray directions. Ray ``k`` of ``n`` follows the
reference StarDist definition (``Rays_GoldenSpiral``), so that distances, models and thresholds
are interchangeable with it:

* ``z_k = -1 + 2 k / (n - 1)`` (ray 0 points along -z, ray ``n - 1`` along +z),
  ``phi_k = k * (3 - sqrt(5)) * pi`` (the golden angle) and ``rho_k = sqrt(1 - z_k^2)``;
* the unit direction is ``(z_k, rho_k sin(phi_k), rho_k cos(phi_k))`` divided component-wise by
  the anisotropy ``(a_z, a_y, a_x)`` and normalised to unit length (in voxel units). With
  ``a_z > 1`` (z voxels larger than xy voxels) the rays bunch towards the xy plane in voxel space,
  which makes them evenly spread in physical space;
* directions are stored in float32 (computed in float64, then rounded), as the reference does.

Faces are the triangles of the convex hull of the anisotropy-scaled lattice points (before
normalisation). Their radial projections tile the sphere, so every direction lies in the cone of
exactly one face (or on a shared edge), and a star-convex polyhedron is the union of the
tetrahedra ``(centre, d_a u_a, d_b u_b, d_c u_c)`` of its faces. Each face is oriented outwards
in the reference's sense: ``det([u_a, u_b, u_c]) < 0`` with rows in ``(z, y, x)`` order (which is
counter-clockwise seen from outside in ``(x, y, z)`` order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.spatial import ConvexHull


@dataclass(frozen=True, eq=False)
class Rays3D:
    """Unit ray directions and the faces of the star-convex polyhedra they span.

    Attributes
    ----------
    vertices : np.ndarray
        float32 (R, 3) unit directions ``(dz, dy, dx)`` in voxel space.
    faces : np.ndarray
        int64 (F, 3) ray indices of each triangle, oriented outwards (``F = 2 R - 4``).
    anisotropy : tuple of float
        ``(a_z, a_y, a_x)`` the directions were made for (voxel size ratios).
    """

    vertices: np.ndarray
    faces: np.ndarray
    anisotropy: tuple[float, float, float]

    def __len__(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def n_rays(self) -> int:
        """Number of rays ``R``."""
        return len(self)


def normalize_anisotropy(
    anisotropy: Sequence[float] | None = None, pixel_size: Sequence[float] | None = None
) -> tuple[float, float, float]:
    """Anisotropy ``(a_z, a_y, a_x)`` from an explicit value or from voxel sizes ``(z, y, x)``.

    Only ratios matter (the rays and the anisotropy-aware distance transform are invariant to a
    common factor), so voxel sizes are scaled to a smallest value of 1. Neither given means
    isotropic voxels.
    """
    if anisotropy is not None and pixel_size is not None:
        raise ValueError("give either anisotropy or pixel_size, not both")
    values = anisotropy if anisotropy is not None else pixel_size
    if values is None:
        return (1.0, 1.0, 1.0)
    values = tuple(float(v) for v in values)
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        name = "anisotropy" if anisotropy is not None else "pixel_size"
        raise ValueError(f"{name} must be three positive numbers (z, y, x), got {values}")
    if pixel_size is not None:
        smallest = min(values)
        values = tuple(v / smallest for v in values)
    return values  # type: ignore[return-value]


def golden_spiral_rays(
    n_rays: int = 64,
    anisotropy: Sequence[float] | None = None,
    pixel_size: Sequence[float] | None = None,
) -> Rays3D:
    """Golden-spiral ray directions and their faces (see the module docstring).

    Parameters
    ----------
    n_rays : int
        Number of rays (at least 4; 64 and 96 are common).
    anisotropy : sequence of float, optional
        ``(a_z, a_y, a_x)``: how much larger a voxel is along each axis (e.g. ``(2, 1, 1)`` for a
        z step twice the xy pixel size).
    pixel_size : sequence of float, optional
        Voxel size ``(z, y, x)`` in any unit, instead of ``anisotropy``.

    Returns
    -------
    Rays3D
        Directions in float32 (identical to the reference's ``Rays_GoldenSpiral(n, anisotropy)``)
        and outward-oriented faces.
    """
    n = int(n_rays)
    if n < 4:
        raise ValueError(f"n_rays must be at least 4, got {n_rays}")
    scale = np.asarray(normalize_anisotropy(anisotropy, pixel_size), dtype=np.float64)
    golden_angle = (3.0 - math.sqrt(5.0)) * math.pi
    phi = golden_angle * np.arange(n)
    z = np.linspace(-1.0, 1.0, n)
    rho = np.sqrt(1.0 - z**2)
    points = np.stack([z, rho * np.sin(phi), rho * np.cos(phi)], axis=1) / scale
    faces = ConvexHull(points).simplices.astype(np.int64)
    # Outwards in the reference's sense: negative determinant of the (z, y, x) rows.
    flip = np.linalg.det(points[faces]) > 0
    faces[flip] = faces[flip][:, ::-1]
    vertices = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    vertices.setflags(write=False)
    faces.setflags(write=False)
    return Rays3D(vertices, faces, tuple(float(s) for s in scale))  # type: ignore[arg-type]
