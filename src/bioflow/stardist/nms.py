"""Greedy non-maximum suppression (NMS) of star-convex polygon candidates.

Candidates above ``prob_thresh`` are visited in order of decreasing probability (equal
probabilities in order of increasing candidate index); a candidate is kept unless a polygon kept
before it overlaps it by more than ``nms_thresh``, where the overlap of candidate ``c`` and kept
polygon ``k`` is

* ``"min_area"`` (the reference StarDist criterion): ``|c & k| / min(|c|, |k|)``,
* ``"iou"``: ``|c & k| / |c | k|``.

The result is exactly that of the sequential greedy loop; the implementation only reorganises the
work so that it vectorises:

* candidates are processed in blocks (of adaptive size). A block is first compared with all
  polygons kept so far in one batch; the few candidates that survive are then resolved among
  themselves in order (a short loop on the CPU);
* only pairs whose circumscribed circles intersect are compared. They are found through a uniform
  grid of cells as wide as the largest possible sum of two radii, so partners lie in the same or
  a neighbouring cell;
* a pair is decided without polygon geometry when circle bounds settle it: the intersection lies
  between the lens-shaped intersection of the inscribed circles (each polygon contains the circle
  about its centre that touches its nearest edge line) and that of the circumscribed circles. The
  bounds are used with a safety margin, so rounding cannot flip a decision;
* all other pairs get the exact intersection of :mod:`bioflow.stardist.polygons`, computed in
  float32 (so only overlaps within about 1e-5 of ``nms_thresh`` can depend on rounding) and in
  stages that stop as soon as bounds on the area settle the comparison. A candidate is compared
  with its most likely suppressor (the nearest kept centre) first, and with its other neighbours
  only if that one does not suppress it.

Everything runs on the device of the inputs, in batches large enough to fill an accelerator.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Literal, Sequence, TypeVar

import numpy as np
import torch

from bioflow.stardist.polygons import intersection_exceeds, polygon_table, polygons_to_labels

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)
Criterion = Literal["min_area", "iou"]

# Relative safety margin of the circle bounds: far above float32 rounding, far below anything
# that would send many pairs to the exact computation.
_BOUND_MARGIN = 1e-4
# Block sizes adapt between these: small blocks while many candidates survive (each survivor is
# compared with the others of its block), large ones once most are suppressed.
_MIN_BLOCK, _MAX_BLOCK = 1 << 10, 1 << 14
# Grid look-ups per batch of queries when searching for neighbours.
_PAIR_BUDGET = 1 << 22


def non_maximum_suppression(
    points: ArrayOrTensor,
    dists: ArrayOrTensor,
    probs: ArrayOrTensor,
    prob_thresh: float = 0.5,
    nms_thresh: float = 0.4,
    criterion: Criterion = "min_area",
) -> ArrayOrTensor:
    """Indices of the candidates kept by greedy non-maximum suppression.

    Parameters
    ----------
    points : np.ndarray or torch.Tensor
        (N, 2) polygon centres ``(y, x)``.
    dists : np.ndarray or torch.Tensor
        (N, R) ray distances.
    probs : np.ndarray or torch.Tensor
        (N,) object probabilities (scores).
    prob_thresh : float
        Only candidates with ``prob > prob_thresh`` take part.
    nms_thresh : float
        A candidate is suppressed when its overlap with an already kept polygon is greater than
        this (between 0 and 1).
    criterion : {"min_area", "iou"}
        Overlap measure, see the module docstring.

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
    scores = probs if isinstance(probs, torch.Tensor) else torch.as_tensor(np.asarray(probs))
    device = scores.device
    centres = torch.as_tensor(points, device=device).to(torch.float32)
    rays = torch.as_tensor(dists, device=device).to(torch.float32)
    n = scores.shape[0] if scores.ndim == 1 else -1
    if centres.shape != (n, 2) or rays.ndim != 2 or rays.shape[0] != n:
        raise ValueError(
            "expected points (N, 2), dists (N, R) and probs (N,), got "
            f"{tuple(centres.shape)}, {tuple(rays.shape)} and {tuple(scores.shape)}"
        )
    if rays.shape[1] < 3:
        raise ValueError(f"need at least 3 rays, got {rays.shape[1]}")

    candidates = torch.nonzero(scores > prob_thresh, as_tuple=True)[0]
    order = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices]
    kept = _Suppressor(centres[order], rays[order], float(nms_thresh), criterion).run()
    result = order[kept]
    return result if isinstance(probs, torch.Tensor) else result.cpu().numpy()


def instances_from_prediction(
    prob: ArrayOrTensor,
    dists: ArrayOrTensor,
    prob_thresh: float = 0.5,
    nms_thresh: float = 0.4,
    grid: Sequence[int] = (1, 1),
    shape: Sequence[int] | None = None,
    criterion: Criterion = "min_area",
) -> tuple[ArrayOrTensor, dict[str, ArrayOrTensor]]:
    """Label image and polygons from a dense StarDist prediction.

    Parameters
    ----------
    prob : np.ndarray or torch.Tensor
        (H', W') object probabilities on the grid lattice.
    dists : np.ndarray or torch.Tensor
        (H', W', R) ray distances in full-resolution pixels.
    prob_thresh, nms_thresh, criterion
        As in :func:`non_maximum_suppression`.
    grid : tuple of int
        Subsampling ``(gy, gx)`` of the prediction: lattice pixel ``(i, j)`` is the full-resolution
        pixel ``(i * gy, j * gx)``.
    shape : tuple of int, optional
        Full-resolution image shape; defaults to ``(H' * gy, W' * gx)``.

    Returns
    -------
    labels : np.ndarray or torch.Tensor
        int32 label image of ``shape``; label ``i + 1`` is the ``i``-th kept polygon.
    details : dict
        ``"points"`` (K, 2) full-resolution centres, ``"probs"`` (K,), ``"dists"`` (K, R) of the kept
        polygons in order of decreasing probability.
    """
    scores = prob if isinstance(prob, torch.Tensor) else torch.as_tensor(np.asarray(prob))
    rays = torch.as_tensor(dists, device=scores.device)
    if scores.ndim != 2 or rays.ndim != 3 or rays.shape[:2] != scores.shape:
        raise ValueError(
            f"expected prob (H, W) and dists (H, W, R), got {tuple(scores.shape)} and {tuple(rays.shape)}"
        )
    gy, gx = (int(g) for g in grid)
    out_shape = (scores.shape[0] * gy, scores.shape[1] * gx) if shape is None else tuple(int(s) for s in shape)
    rows, cols = torch.nonzero(scores > prob_thresh, as_tuple=True)
    points = torch.stack([rows * gy, cols * gx], dim=1)
    cand_probs, cand_dists = scores[rows, cols], rays[rows, cols]
    kept = non_maximum_suppression(points, cand_dists, cand_probs, prob_thresh, nms_thresh, criterion)
    details = {"points": points[kept], "probs": cand_probs[kept], "dists": cand_dists[kept]}
    labels = polygons_to_labels(details["points"], details["dists"], details["probs"], out_shape)
    if isinstance(prob, torch.Tensor):
        return labels, details
    return labels.cpu().numpy(), {key: value.cpu().numpy() for key, value in details.items()}


def _lens_areas(r1: torch.Tensor, r2: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Areas of the intersections of two discs with radii ``r1``, ``r2`` at ``distance``."""
    d = distance.clamp(min=1e-12)
    cos1 = ((d * d + r1 * r1 - r2 * r2) / (2 * d * r1.clamp(min=1e-12))).clamp(-1.0, 1.0)
    cos2 = ((d * d + r2 * r2 - r1 * r1) / (2 * d * r2.clamp(min=1e-12))).clamp(-1.0, 1.0)
    kite = (-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2)
    lens = r1 * r1 * torch.acos(cos1) + r2 * r2 * torch.acos(cos2) - 0.5 * torch.sqrt(kite.clamp(min=0.0))
    small = torch.minimum(r1, r2)
    lens = torch.where(distance <= (r1 - r2).abs(), math.pi * small * small, lens)
    return torch.where(distance >= r1 + r2, torch.zeros_like(lens), lens.clamp(min=0.0))


class _Grid:
    """Uniform grid over the polygon centres, for finding pairs that may overlap.

    Two polygons can only overlap if their circumscribed circles intersect, i.e. if their centres
    are closer than the sum of the radii, at most ``reach``. With cells of side ``reach / 2`` the
    centre of any overlapping partner lies within two cells in each direction (a 5 x 5 block, which
    is about twice the area of the disc of radius ``reach``; a 3 x 3 block of wider cells would be
    three times).
    """

    def __init__(self, centres: torch.Tensor, reach: float) -> None:
        self.cell = cell = reach / 2
        self.origin = centres.amin(dim=0)
        self.n_rows, self.n_cols = (int(v) + 1 for v in ((centres.amax(dim=0) - self.origin) / cell).tolist())
        self.cells = self._cells_of(centres)

    def _cells_of(self, centres: torch.Tensor) -> torch.Tensor:
        row_col = torch.floor((centres - self.origin) / self.cell).to(torch.int64)
        return row_col[:, 0] * self.n_cols + row_col[:, 1]

    def pairs(self, queries: torch.Tensor, members: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All ``(q, m)`` with ``q`` in ``queries`` and ``m`` in ``members`` in nearby cells.

        Yielded in batches of queries that bound the memory even when many members crowd into
        few cells.
        """
        device = queries.device
        cells, sort = torch.sort(self.cells.index_select(0, members))
        members = members.index_select(0, sort)
        # The members of a cell are a run of the sorted list: its start and length per cell.
        crowd = torch.bincount(cells, minlength=self.n_rows * self.n_cols)
        runs = torch.cumsum(crowd, 0) - crowd
        busiest = int(crowd.max()) if crowd.numel() else 1
        shift = torch.arange(-2, 3, device=device)
        for batch in queries.split(max(1, _PAIR_BUDGET // (25 * max(busiest, 1)))):
            # The 5 x 5 cells around each query; cells off the grid are dropped.
            query_cells = self.cells.index_select(0, batch)
            row = torch.div(query_cells, self.n_cols, rounding_mode="floor")
            col = query_cells - row * self.n_cols
            rows = (row[:, None] + shift)[:, :, None].expand(-1, 5, 5).reshape(-1)
            cols = (col[:, None] + shift)[:, None, :].expand(-1, 5, 5).reshape(-1)
            inside = (rows >= 0) & (rows < self.n_rows) & (cols >= 0) & (cols < self.n_cols)
            valid = torch.nonzero(inside, as_tuple=True)[0]
            around = rows.index_select(0, valid) * self.n_cols + cols.index_select(0, valid)
            first, count = runs.index_select(0, around), crowd.index_select(0, around)
            entry = torch.repeat_interleave(torch.arange(around.numel(), device=device), count)
            rank = torch.arange(entry.numel(), device=device) - (torch.cumsum(count, 0) - count).index_select(0, entry)
            query = torch.div(valid.index_select(0, entry), 25, rounding_mode="floor")
            yield batch.index_select(0, query), members.index_select(0, first.index_select(0, entry) + rank)


class _Suppressor:
    """Greedy NMS over candidates sorted by decreasing probability.

    Polygon tables (the per-ray geometry the exact test needs) exist only for the current block
    and the kept polygons; ``rows`` maps a candidate to its row in the working table.
    """

    def __init__(self, centres: torch.Tensor, dists: torch.Tensor, threshold: float, criterion: Criterion) -> None:
        self.centres, self.dists = centres, dists
        self.threshold, self.criterion = threshold, criterion
        self.device = centres.device
        n, n_rays = dists.shape
        following = dists.roll(-1, dims=1)
        products = dists * following
        sin, cos = math.sin(2 * math.pi / n_rays), math.cos(2 * math.pi / n_rays)
        self.areas = 0.5 * sin * products.sum(dim=1)
        self.outer = dists.amax(dim=1) if n else dists.new_zeros(0)
        # Inscribed radius: distance from the centre to the nearest edge line, i.e. twice a
        # triangle's area over its outer edge (zero for a polygon that touches its centre).
        edges = torch.sqrt((dists * dists + following * following - 2 * cos * products).clamp(min=0.0))
        heights = sin * products / edges.clamp(min=torch.finfo(dists.dtype).tiny)
        self.inner = torch.minimum(heights.amin(dim=1), self.outer) if n else dists.new_zeros(0)
        self.rows = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        if n:
            self.grid = _Grid(centres, max(1.0, 2.0 * float(self.outer.amax())))

    def run(self) -> torch.Tensor:
        """Positions (in the sorted order) of the kept candidates."""
        n = self.centres.shape[0]
        kept = torch.zeros(0, dtype=torch.int64, device=self.device)
        kept_table = polygon_table(self.dists[:0])
        start, block = 0, _MIN_BLOCK
        while start < n:
            stop = min(start + block, n)
            candidates = torch.arange(start, stop, device=self.device)
            self.table = torch.cat([kept_table, polygon_table(self.dists[start:stop])], dim=1)
            self.table_centres = torch.cat([self.centres[kept], self.centres[start:stop]])
            self.rows[kept] = torch.arange(kept.numel(), device=self.device)
            self.rows[start:stop] = torch.arange(kept.numel(), kept.numel() + stop - start, device=self.device)
            if kept.numel():
                survivors = candidates[~self._suppressed_by_kept(candidates, kept)]
            else:
                survivors = candidates
            new = self._resolve_in_order(survivors)
            kept = torch.cat([kept, new])
            kept_table = self.table.index_select(1, self.rows[kept])
            # Grow blocks while few candidates survive them, shrink them while many do.
            if survivors.numel() * 16 < block:
                block = min(2 * block, _MAX_BLOCK)
            elif survivors.numel() * 4 > block:
                block = max(block // 2, _MIN_BLOCK)
            start = stop
        return kept

    def _neighbours(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs ``(a[i], b[j])`` (as candidate positions) whose circumscribed circles intersect."""
        found_i, found_j = [], []
        for i, j in self.grid.pairs(a, b):
            reach = self.outer.index_select(0, i) + self.outer.index_select(0, j)
            gap = self.centres.index_select(0, i) - self.centres.index_select(0, j)
            close = torch.nonzero((gap * gap).sum(dim=1) < reach * reach, as_tuple=True)[0]
            found_i.append(i.index_select(0, close))
            found_j.append(j.index_select(0, close))
        return torch.cat(found_i), torch.cat(found_j)

    def _limit(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Intersection area above which ``i`` and ``j`` overlap more than the threshold."""
        if self.criterion == "min_area":
            return self.threshold * torch.minimum(self.areas[i], self.areas[j])
        # |i & j| / (|i| + |j| - |i & j|) > t  <=>  |i & j| > t (|i| + |j|) / (1 + t)
        return self.threshold * (self.areas[i] + self.areas[j]) / (1.0 + self.threshold)

    def _bounds(self, i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which pairs certainly overlap too much, and which are certainly fine, from circles."""
        # In float64: the lens formula's arccosines amplify rounding near tangency.
        gap = (self.centres.index_select(0, i) - self.centres.index_select(0, j)).double()
        distance = gap.norm(dim=1)
        limit = self._limit(i, j).double()
        lower = _lens_areas(self.inner[i].double(), self.inner[j].double(), distance)
        upper = torch.minimum(
            _lens_areas(self.outer[i].double(), self.outer[j].double(), distance),
            torch.minimum(self.areas[i], self.areas[j]).double(),
        )
        return lower > limit * (1 + _BOUND_MARGIN) + 1e-6, upper < limit * (1 - _BOUND_MARGIN)

    def _exact(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Whether ``i`` and ``j`` overlap more than the threshold, from exact geometry."""
        return intersection_exceeds(self.table_centres, self.table, self.rows[i], self.rows[j], self._limit(i, j))

    def _suppressed_by_kept(self, candidates: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Which candidates a kept polygon suppresses (bool over ``candidates``)."""
        offset = int(candidates[0])
        suppressed = torch.zeros(candidates.numel(), dtype=torch.bool, device=self.device)
        cand, other = self._neighbours(candidates, kept)
        if cand.numel() == 0:
            return suppressed
        certain, harmless = self._bounds(cand, other)
        suppressed[cand[certain] - offset] = True
        open_pairs = ~certain & ~harmless & ~suppressed[cand - offset]
        cand, other = cand[open_pairs], other[open_pairs]
        if cand.numel() == 0:
            return suppressed
        gap = self.centres.index_select(0, cand) - self.centres.index_select(0, other)
        return suppress_nearest_first(suppressed, cand, offset, other, (gap * gap).sum(dim=1), self._exact)

    def _resolve_in_order(self, survivors: torch.Tensor) -> torch.Tensor:
        """Greedy NMS among the survivors of a block (none of which any earlier polygon suppresses)."""
        if survivors.numel() <= 1:
            return survivors
        earlier, later = self._neighbours(survivors, survivors)
        ahead = earlier < later
        earlier, later = earlier[ahead], later[ahead]
        certain, harmless = self._bounds(earlier, later)
        undecided = ~certain & ~harmless
        certain[undecided] = self._exact(earlier[undecided], later[undecided])
        return greedy_keep(survivors, earlier[certain], later[certain])


def suppress_nearest_first(
    suppressed: torch.Tensor,
    cand: torch.Tensor,
    offset: int,
    other: torch.Tensor,
    distance: torch.Tensor,
    decide: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Mark candidates suppressed by kept shapes, testing each candidate's nearest one first.

    ``(cand[p], other[p])`` are the open (candidate, kept shape) pairs, ``distance[p]`` their
    centre distance, ``cand - offset`` a candidate's position in ``suppressed`` and
    ``decide(cand, other)`` the overlap test. The nearest kept shape usually settles a candidate,
    so the others are only tested for the candidates it spares.
    """
    row = cand - offset
    nearest = torch.full((suppressed.numel(),), math.inf, device=distance.device, dtype=distance.dtype)
    nearest.scatter_reduce_(0, row, distance, "amin")
    first = distance == nearest[row]
    suppressed[row[first][decide(cand[first], other[first])]] = True
    rest = ~first & ~suppressed[row]
    suppressed[row[rest][decide(cand[rest], other[rest])]] = True
    return suppressed


def greedy_keep(ids: torch.Tensor, earlier: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
    """The greedy pass over a block's survivors: visit ``ids`` in increasing order and keep each
    one that no kept id suppresses, where ``earlier[p]`` suppresses ``later[p]``. Inherently
    sequential (and short): runs on the CPU; returns a tensor on the device of ``ids``."""
    earlier, later = earlier.cpu().numpy(), later.cpu().numpy()
    order = np.argsort(earlier, kind="stable")
    earlier, later = earlier[order], later[order]
    values = ids.cpu().numpy()
    first_pair = np.searchsorted(earlier, values, side="left")
    last_pair = np.searchsorted(earlier, values, side="right")
    suppressed: set[int] = set()
    keep = []
    for index, lo, hi in zip(values.tolist(), first_pair.tolist(), last_pair.tolist()):
        if index in suppressed:
            continue
        keep.append(index)
        suppressed.update(later[lo:hi].tolist())
    return torch.tensor(keep, dtype=torch.int64, device=ids.device)
