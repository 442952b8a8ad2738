"""Greedy non-maximum suppression (NMS) of star-convex polyhedron candidates (StarDist 3D).

Candidates above ``prob_thresh`` are visited in order of decreasing probability (equal
probabilities in order of increasing candidate index); a candidate is kept unless a polyhedron
kept before it overlaps it by more than ``nms_thresh``, where the overlap of candidate ``c`` and
kept polyhedron ``k`` is

* ``"min_area"`` (the reference StarDist criterion): ``|c & k| / min(|c|, |k|)``,
* ``"iou"``: ``|c & k| / |c | k|``,

with exact volumes (:func:`~bioflow.stardist.polyhedra.polyhedron_volumes`) and intersection
volumes from :class:`~bioflow.stardist.polyhedra.SampledIntersection`. A pair is decided by the
cheapest test that settles it:

1. only pairs whose bounding boxes overlap are compared (found through a uniform grid of cells);
2. upper bounds on the intersection (the smaller volume, the overlap of the bounding boxes, the
   lens of the circumscribed spheres) and a lower bound (the lens of the inscribed spheres) settle
   most pairs. Spheres are taken in physical units (voxel coordinates times the rays'
   anisotropy), where nuclei are round, so the bounds are tight;
3. the rest get sampled intersection volumes at increasing resolution (2, 16, then 128 points per
   tetrahedron); a coarse estimate settles a pair when it is farther from the limit than that
   resolution's error margin, and the finest one decides.

So the decisions are those of the greedy loop with the overlaps of the finest estimate, whose
error is below 0.5% of the smaller volume (measured: see ``docs/stardist.md``); only pairs whose
exact overlap lies that close to ``nms_thresh`` can be decided differently from exact geometry.

The work is organised as in 2D (:mod:`bioflow.stardist.nms`): candidates are processed in blocks,
each compared with the polyhedra kept so far in one vectorised batch, the survivors of a block
then resolved among themselves in order (a short loop on the CPU). Memory is bounded by the block
and batch sizes, not by the number of candidates, so the candidates of all tiles of a large volume
go through one global NMS. Everything else runs on the device of the inputs.
"""

from __future__ import annotations

import math
from typing import Iterator, Literal, Sequence, TypeVar

import numpy as np
import torch

from bioflow.stardist.nms import greedy_keep, suppress_nearest_first
from bioflow.stardist.polyhedra import SampledIntersection, cones, polyhedra_to_labels
from bioflow.stardist.rays3d import Rays3D

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)
Criterion = Literal["min_area", "iou"]

# (points per tetrahedron, error margin as a fraction of the smaller volume) of the sampled
# estimates; the margins are about three times the largest errors measured at each resolution.
_LEVELS = ((2, 0.12), (16, 0.03), (128, 0.0))
# Relative safety margin of the sphere and box bounds (far above float32 rounding).
_BOUND_MARGIN = 1e-4
_MIN_BLOCK, _MAX_BLOCK = 1 << 10, 1 << 14
# Grid look-ups per batch of queries when searching for neighbours.
_PAIR_BUDGET = 1 << 22
# Candidates whose geometry (volumes, boxes, radii) is computed in one batch.
_FEATURE_BATCH = 1 << 13


def non_maximum_suppression_3d(
    points: ArrayOrTensor,
    dists: ArrayOrTensor,
    probs: ArrayOrTensor,
    rays: Rays3D,
    prob_thresh: float = 0.5,
    nms_thresh: float = 0.4,
    criterion: Criterion = "min_area",
) -> ArrayOrTensor:
    """Indices of the candidates kept by greedy non-maximum suppression of polyhedra.

    Parameters
    ----------
    points : np.ndarray or torch.Tensor
        (N, 3) polyhedron centres ``(z, y, x)`` in full-resolution voxels.
    dists : np.ndarray or torch.Tensor
        (N, R) ray distances (voxels along the unit ray directions of ``rays``).
    probs : np.ndarray or torch.Tensor
        (N,) object probabilities (scores).
    rays : Rays3D
        The rays the distances were predicted for.
    prob_thresh : float
        Only candidates with ``prob > prob_thresh`` take part.
    nms_thresh : float
        A candidate is suppressed when its overlap with an already kept polyhedron is greater than
        this (between 0 and 1).
    criterion : {"min_area", "iou"}
        Overlap measure, see the module docstring (``min_area`` divides by the smaller volume).

    Returns
    -------
    np.ndarray or torch.Tensor
        int64 indices into the candidates, in order of decreasing probability (ties by increasing
        index), of the same kind as ``probs`` (a tensor on its device).
    """
    if criterion not in ("min_area", "iou"):
        raise ValueError(f"criterion must be 'min_area' or 'iou', got {criterion!r}")
    if not 0.0 <= float(nms_thresh) <= 1.0:
        raise ValueError(f"nms_thresh must be between 0 and 1, got {nms_thresh}")
    if not isinstance(rays, Rays3D):
        raise TypeError(f"rays must be a Rays3D (see golden_spiral_rays), got {type(rays).__name__}")
    scores = probs if isinstance(probs, torch.Tensor) else torch.as_tensor(np.asarray(probs))
    device = scores.device
    centres = torch.as_tensor(np.asarray(points) if not isinstance(points, torch.Tensor) else points, device=device)
    rays_d = torch.as_tensor(np.asarray(dists) if not isinstance(dists, torch.Tensor) else dists, device=device)
    centres, rays_d = centres.to(torch.float32), rays_d.to(torch.float32)
    n = scores.shape[0] if scores.ndim == 1 else -1
    if centres.shape != (n, 3) or rays_d.shape != (n, len(rays)):
        raise ValueError(
            f"expected points (N, 3), dists (N, {len(rays)}) and probs (N,), got "
            f"{tuple(centres.shape)}, {tuple(rays_d.shape)} and {tuple(scores.shape)}"
        )
    candidates = torch.nonzero(scores > prob_thresh, as_tuple=True)[0]
    order = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices]
    kept = _Suppressor3D(centres[order], rays_d[order].clamp_(min=0.0), rays, float(nms_thresh), criterion).run()
    result = order[kept]
    return result if isinstance(probs, torch.Tensor) else result.cpu().numpy()


def instances_from_prediction_3d(
    prob: ArrayOrTensor,
    dists: ArrayOrTensor,
    rays: Rays3D,
    prob_thresh: float = 0.5,
    nms_thresh: float = 0.4,
    grid: Sequence[int] = (1, 1, 1),
    shape: Sequence[int] | None = None,
    criterion: Criterion = "min_area",
) -> tuple[ArrayOrTensor, dict[str, ArrayOrTensor]]:
    """Label volume and polyhedra from a dense StarDist 3D prediction.

    Parameters
    ----------
    prob : np.ndarray or torch.Tensor
        (Z', Y', X') object probabilities on the grid lattice.
    dists : np.ndarray or torch.Tensor
        (Z', Y', X', R) ray distances in full-resolution voxels.
    rays : Rays3D
    prob_thresh, nms_thresh, criterion
        As in :func:`non_maximum_suppression_3d`.
    grid : tuple of int
        Subsampling ``(gz, gy, gx)``: lattice voxel ``(i, j, k)`` is the voxel ``(i gz, j gy, k gx)``.
    shape : tuple of int, optional
        Full-resolution volume shape; defaults to ``(Z' gz, Y' gy, X' gx)``.

    Returns
    -------
    labels : np.ndarray or torch.Tensor
        int32 label volume of ``shape``; label ``i + 1`` is the ``i``-th kept polyhedron.
    details : dict
        ``"points"`` (K, 3) full-resolution centres, ``"probs"`` (K,), ``"dists"`` (K, R) of the kept
        polyhedra in order of decreasing probability.
    """
    scores = prob if isinstance(prob, torch.Tensor) else torch.as_tensor(np.asarray(prob))
    values = torch.as_tensor(np.asarray(dists) if not isinstance(dists, torch.Tensor) else dists, device=scores.device)
    if scores.ndim != 3 or values.ndim != 4 or values.shape[:3] != scores.shape:
        raise ValueError(
            f"expected prob (Z, Y, X) and dists (Z, Y, X, R), got {tuple(scores.shape)} and {tuple(values.shape)}"
        )
    step = torch.tensor([int(g) for g in grid], device=scores.device)
    if step.numel() != 3 or int(step.min()) < 1:
        raise ValueError(f"grid must be three positive integers (z, y, x), got {tuple(grid)}")
    out_shape = tuple(int(s) * int(g) for s, g in zip(scores.shape, grid)) if shape is None else tuple(int(s) for s in shape)
    where = torch.nonzero(scores > prob_thresh)
    points = where * step
    cand_probs, cand_dists = scores[tuple(where.T)], values[tuple(where.T)]
    kept = non_maximum_suppression_3d(points, cand_dists, cand_probs, rays, prob_thresh, nms_thresh, criterion)
    details = {"points": points[kept], "probs": cand_probs[kept], "dists": cand_dists[kept]}
    labels = polyhedra_to_labels(details["points"], details["dists"], details["probs"], out_shape, rays)
    if isinstance(prob, torch.Tensor):
        return labels, details
    return labels.cpu().numpy(), {key: value.cpu().numpy() for key, value in details.items()}


def _ball_lens(r1: torch.Tensor, r2: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Volumes of the intersections of two balls with radii ``r1``, ``r2`` at ``distance``."""
    d = distance.clamp(min=1e-12)
    total = r1 + r2
    lens = math.pi * (total - d).clamp(min=0.0) ** 2 * (d * d + 2 * d * total - 3 * (r1 - r2) ** 2) / (12 * d)
    small = torch.minimum(r1, r2)
    lens = torch.where(distance <= (r1 - r2).abs(), (4 * math.pi / 3) * small**3, lens)
    return torch.where(distance >= total, torch.zeros_like(lens), lens.clamp(min=0.0))


class _Grid3D:
    """Uniform grid over the centres; cells are as wide as the widest pair of boxes can reach,
    so any pair of overlapping boxes has its centres in the same or neighbouring cells."""

    def __init__(self, centres: torch.Tensor, reach: torch.Tensor) -> None:
        self.cell = reach.clamp(min=1.0)
        self.origin = centres.amin(dim=0)
        self.size = (((centres.amax(dim=0) - self.origin) / self.cell).floor().long() + 1).tolist()
        self.cells = self._cells_of(centres)

    def _cells_of(self, centres: torch.Tensor) -> torch.Tensor:
        index = torch.floor((centres - self.origin) / self.cell).long()
        return (index[:, 0] * self.size[1] + index[:, 1]) * self.size[2] + index[:, 2]

    def pairs(self, queries: torch.Tensor, members: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All ``(q, m)`` with ``q`` in ``queries`` and ``m`` in ``members`` in neighbouring cells."""
        device = queries.device
        cells, sort = torch.sort(self.cells.index_select(0, members))
        members = members.index_select(0, sort)
        n_cells = self.size[0] * self.size[1] * self.size[2]
        crowd = torch.bincount(cells, minlength=n_cells)
        runs = torch.cumsum(crowd, 0) - crowd
        busiest = int(crowd.max()) if crowd.numel() else 1
        shift = torch.arange(-1, 2, device=device)
        sz, sy, sx = self.size
        for batch in queries.split(max(1, _PAIR_BUDGET // (27 * max(busiest, 1)))):
            cell = self.cells.index_select(0, batch)
            z = torch.div(cell, sy * sx, rounding_mode="floor")
            y = torch.div(cell, sx, rounding_mode="floor") % sy
            x = cell % sx
            zz = (z[:, None] + shift)[:, :, None, None].expand(-1, 3, 3, 3).reshape(-1)
            yy = (y[:, None] + shift)[:, None, :, None].expand(-1, 3, 3, 3).reshape(-1)
            xx = (x[:, None] + shift)[:, None, None, :].expand(-1, 3, 3, 3).reshape(-1)
            inside = (zz >= 0) & (zz < sz) & (yy >= 0) & (yy < sy) & (xx >= 0) & (xx < sx)
            valid = torch.nonzero(inside, as_tuple=True)[0]
            around = (zz[valid] * sy + yy[valid]) * sx + xx[valid]
            first, count = runs.index_select(0, around), crowd.index_select(0, around)
            entry = torch.repeat_interleave(torch.arange(around.numel(), device=device), count)
            rank = torch.arange(entry.numel(), device=device) - (torch.cumsum(count, 0) - count).index_select(0, entry)
            query = torch.div(valid.index_select(0, entry), 27, rounding_mode="floor")
            yield batch.index_select(0, query), members.index_select(0, first.index_select(0, entry) + rank)


class _Suppressor3D:
    """Greedy NMS over candidates sorted by decreasing probability."""

    def __init__(self, centres: torch.Tensor, dists: torch.Tensor, rays: Rays3D, threshold: float,
                 criterion: Criterion) -> None:
        self.centres, self.dists = centres, dists
        self.threshold, self.criterion = threshold, criterion
        self.device = device = centres.device
        self.scale = torch.tensor(rays.anisotropy, dtype=torch.float32, device=device)
        self.cone = cones(rays, device, torch.float32)
        self.estimators = [(SampledIntersection(rays, s, device), margin) for s, margin in _LEVELS]
        n = centres.shape[0]
        self.volumes = torch.empty(n, device=device)
        self.outer = torch.empty(n, device=device)
        self.inner = torch.empty(n, device=device)
        self.lo = torch.empty((n, 3), device=device)
        self.hi = torch.empty((n, 3), device=device)
        for start in range(0, n, _FEATURE_BATCH):
            self._features(slice(start, min(start + _FEATURE_BATCH, n)))
        if n:
            self.grid = _Grid3D(centres, 2 * (self.hi - self.lo).amax(dim=0))

    def _features(self, rows: slice) -> None:
        """Volumes, boxes and inscribed/circumscribed sphere radii (physical units) of candidates."""
        cone, d = self.cone, self.dists[rows]
        vertices = d[:, :, None] * cone.directions  # relative to the centre
        self.lo[rows] = vertices.amin(dim=1).clamp(max=0.0) + self.centres[rows]
        self.hi[rows] = vertices.amax(dim=1).clamp(min=0.0) + self.centres[rows]
        self.volumes[rows] = (d[:, cone.faces].prod(dim=2) * cone.volume_factor).sum(dim=1)
        scaled = vertices * self.scale
        self.outer[rows] = scaled.norm(dim=2).amax(dim=1)
        a, b, c = (scaled[:, cone.faces[:, k]] for k in range(3))
        normal = torch.linalg.cross(b - a, c - a, dim=2)
        # Distance from the centre to each face plane; the ball below the smallest lies inside
        # the polyhedron (each cone's part of the ball is below that cone's face). A zero-area
        # face has no plane: it only arises from zero distances, where the radius is 0 anyway.
        height = (a * normal).sum(dim=2).abs() / normal.norm(dim=2).clamp(min=1e-20)
        degenerate = normal.norm(dim=2) <= 1e-12 * self.outer[rows, None].clamp(min=1.0) ** 2
        height = torch.where(degenerate, torch.zeros_like(height), height)
        self.inner[rows] = torch.minimum(height.amin(dim=1), self.outer[rows])

    def run(self) -> torch.Tensor:
        """Positions (in the sorted order) of the kept candidates."""
        n = self.centres.shape[0]
        kept = torch.zeros(0, dtype=torch.int64, device=self.device)
        start, block = 0, _MIN_BLOCK
        while start < n:
            stop = min(start + block, n)
            candidates = torch.arange(start, stop, device=self.device)
            survivors = candidates[~self._suppressed_by(candidates, kept)] if kept.numel() else candidates
            kept = torch.cat([kept, self._resolve_in_order(survivors)])
            # Grow blocks while few candidates survive them, shrink them while many do.
            if survivors.numel() * 16 < block:
                block = min(2 * block, _MAX_BLOCK)
            elif survivors.numel() * 4 > block:
                block = max(block // 2, _MIN_BLOCK)
            start = stop
        return kept

    def _neighbours(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs ``(a[i], b[j])`` whose bounding boxes overlap."""
        found_i, found_j = [a[:0]], [b[:0]]
        for i, j in self.grid.pairs(a, b):
            overlap = ((torch.minimum(self.hi[i], self.hi[j]) - torch.maximum(self.lo[i], self.lo[j])) > 0).all(dim=1)
            close = torch.nonzero(overlap, as_tuple=True)[0]
            found_i.append(i[close])
            found_j.append(j[close])
        return torch.cat(found_i), torch.cat(found_j)

    def _limit(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Intersection volume above which ``i`` and ``j`` overlap more than the threshold."""
        if self.criterion == "min_area":
            return self.threshold * torch.minimum(self.volumes[i], self.volumes[j])
        # |i & j| / (|i| + |j| - |i & j|) > t  <=>  |i & j| > t (|i| + |j|) / (1 + t)
        return self.threshold * (self.volumes[i] + self.volumes[j]) / (1.0 + self.threshold)

    def _decide(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Whether ``i`` and ``j`` overlap more than the threshold (bool per pair)."""
        limit = self._limit(i, j).double()
        gap = ((self.centres[i] - self.centres[j]) * self.scale).double().norm(dim=1)
        # Lens volumes in physical units, divided by the voxel volume to get voxels.
        voxel = float(self.scale.prod())
        box = (torch.minimum(self.hi[i], self.hi[j]) - torch.maximum(self.lo[i], self.lo[j])).clamp(min=0.0)
        upper = torch.minimum(
            torch.minimum(self.volumes[i], self.volumes[j]).double(),
            torch.minimum(box.double().prod(dim=1), _ball_lens(self.outer[i].double(), self.outer[j].double(), gap) / voxel),
        )
        lower = _ball_lens(self.inner[i].double(), self.inner[j].double(), gap) / voxel
        result = lower > limit * (1 + _BOUND_MARGIN) + 1e-6
        open_pairs = torch.nonzero(~result & (upper >= limit * (1 - _BOUND_MARGIN)), as_tuple=True)[0]
        smaller = torch.minimum(self.volumes[i], self.volumes[j])
        for estimator, margin in self.estimators:
            if open_pairs.numel() == 0:
                break
            pi, pj = i[open_pairs], j[open_pairs]
            estimate = estimator(self.centres, self.dists, self.volumes, pi, pj).double()
            excess = estimate - limit[open_pairs]
            result[open_pairs] = excess > 0
            settled = excess.abs() > margin * smaller[open_pairs].double()
            open_pairs = open_pairs[~settled]
        return result

    def _suppressed_by(self, candidates: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Which candidates a kept polyhedron suppresses (bool over ``candidates``)."""
        offset = int(candidates[0])
        suppressed = torch.zeros(candidates.numel(), dtype=torch.bool, device=self.device)
        cand, other = self._neighbours(candidates, kept)
        if cand.numel() == 0:
            return suppressed
        distance = ((self.centres[cand] - self.centres[other]) * self.scale).pow(2).sum(dim=1)
        return suppress_nearest_first(suppressed, cand, offset, other, distance, self._decide)

    def _resolve_in_order(self, survivors: torch.Tensor) -> torch.Tensor:
        """Greedy NMS among the survivors of a block (none of which any earlier polyhedron suppresses)."""
        if survivors.numel() <= 1:
            return survivors
        earlier, later = self._neighbours(survivors, survivors)
        ahead = earlier < later
        earlier, later = earlier[ahead], later[ahead]
        hit = self._decide(earlier, later)
        return greedy_keep(survivors, earlier[hit], later[hit])

