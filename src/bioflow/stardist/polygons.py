"""Star-convex polygons: vertices, areas, exact pairwise intersection areas and rendering.

A star-convex polygon is given by a centre ``(y, x)`` and ``R`` non-negative distances along the
rays of :mod:`bioflow.stardist.targets`: vertex ``k`` is ``centre + d_k * (sin(phi_k), cos(phi_k))``
with ``phi_k = 2 pi k / R``. The polygon is the union of the triangles ``(centre, v_k, v_{k+1})``, so it
is star-convex about its centre (though generally not convex) and a point's triangle is found
from its angle about the centre alone.

Intersection areas are exact (up to floating-point rounding): Green's theorem writes the area of
``A & B`` as the integral of ``(x dy - y dx) / 2`` over its boundary, which consists of the parts of
the edges of ``A`` that lie inside ``B`` and the parts of the edges of ``B`` that lie inside ``A``.
Along a straight edge the integrand is constant, so each edge contributes its integrand times the
fraction of its length inside the other polygon. That fraction is found exactly by cutting the
edge where it crosses the rays of the other polygon: between two crossings the edge stays in one
triangle of the other polygon, whose outer side is a single straight line. Edges that lie on the
other polygon's boundary (e.g. two identical polygons) are counted once when they run in the same
direction and not at all when they run in opposite directions, as the boundary of the
intersection requires.
"""

from __future__ import annotations

import math
from typing import Iterator, TypeVar

import numpy as np
import torch

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


def ray_directions(
    n_rays: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Unit ray directions ``(sin(phi_k), cos(phi_k))`` as ``(dy, dx)``, shape (n_rays, 2)."""
    phi = torch.arange(n_rays, dtype=torch.float64) * (2 * math.pi / n_rays)
    return torch.stack([torch.sin(phi), torch.cos(phi)], dim=1).to(dtype=dtype, device=device)


def _as_tensor(
    value: np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    return tensor.to(dtype=dtype, device=device if device is not None else tensor.device)


def _check_polygons(points: torch.Tensor, dists: torch.Tensor) -> None:
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {tuple(points.shape)}")
    if dists.ndim != 2 or dists.shape[0] != points.shape[0] or dists.shape[1] < 3:
        raise ValueError(
            f"dists must have shape (N, R) with R >= 3 and N = {points.shape[0]}, got {tuple(dists.shape)}"
        )


def _like(result: torch.Tensor, template: np.ndarray | torch.Tensor) -> ArrayOrTensor:
    return result if isinstance(template, torch.Tensor) else result.cpu().numpy()


def polygon_vertices(points: ArrayOrTensor, dists: ArrayOrTensor) -> ArrayOrTensor:
    """Vertex coordinates of star-convex polygons.

    Parameters
    ----------
    points : np.ndarray or torch.Tensor
        (N, 2) centres ``(y, x)``.
    dists : np.ndarray or torch.Tensor
        (N, R) distances along the rays.

    Returns
    -------
    np.ndarray or torch.Tensor
        (N, R, 2) float64 vertices ``(y, x)``, of the same kind as ``dists``.
    """
    d = _as_tensor(dists, torch.float64)
    p = _as_tensor(points, torch.float64, d.device)
    _check_polygons(p, d)
    u = ray_directions(d.shape[1], device=d.device)
    return _like(p[:, None, :] + d[:, :, None] * u, dists)


def polygon_areas(dists: ArrayOrTensor) -> ArrayOrTensor:
    """Areas of star-convex polygons, ``sin(2 pi / R) / 2 * sum_k d_k d_{k+1}``.

    Parameters
    ----------
    dists : np.ndarray or torch.Tensor
        (N, R) distances along the rays (the centres do not matter).

    Returns
    -------
    np.ndarray or torch.Tensor
        (N,) float64 areas, of the same kind as ``dists``.
    """
    d = _as_tensor(dists, torch.float64)
    if d.ndim != 2 or d.shape[1] < 3:
        raise ValueError(f"dists must have shape (N, R) with R >= 3, got {tuple(d.shape)}")
    return _like(_areas(d), dists)


def _areas(dists: torch.Tensor) -> torch.Tensor:
    n_rays = dists.shape[1]
    return 0.5 * math.sin(2 * math.pi / n_rays) * (dists * dists.roll(-1, dims=1)).sum(dim=1)


def polygon_intersection_areas(
    points_a: ArrayOrTensor, dists_a: ArrayOrTensor, points_b: ArrayOrTensor, dists_b: ArrayOrTensor
) -> ArrayOrTensor:
    """Exact areas of the intersections of polygon pairs ``(a[i], b[i])``.

    Parameters
    ----------
    points_a, points_b : np.ndarray or torch.Tensor
        (P, 2) centres ``(y, x)``.
    dists_a, dists_b : np.ndarray or torch.Tensor
        (P, R) ray distances; both polygons of a pair use the same rays.

    Returns
    -------
    np.ndarray or torch.Tensor
        (P,) float64 intersection areas, of the same kind as ``dists_a``.
    """
    da = _as_tensor(dists_a, torch.float64)
    device = da.device
    pa, pb = _as_tensor(points_a, torch.float64, device), _as_tensor(points_b, torch.float64, device)
    db = _as_tensor(dists_b, torch.float64, device)
    _check_polygons(pa, da)
    _check_polygons(pb, db)
    if da.shape != db.shape:
        raise ValueError(
            f"dists_a and dists_b must have the same shape, got {tuple(da.shape)} and {tuple(db.shape)}"
        )
    n_pairs = pa.shape[0]
    index = torch.arange(n_pairs, device=device)
    table = polygon_table(torch.cat([da, db]))
    return _like(intersection_areas(torch.cat([pa, pb]), table, index, index + n_pairs), dists_a)


# Rows of a polygon table: vertex offsets from the centre, edge vectors, twice the triangle areas,
# each outer edge as a line (unit normal and offset), and the largest ray distance.
_PY, _PX, _EY, _EX, _TRI, _NY, _NX, _NC, _RMAX = range(9)


def polygon_table(dists: torch.Tensor) -> torch.Tensor:
    """Per-ray geometry of polygons, shape (9, N, R), in the dtype of ``dists``.

    For ray ``k``: the vertex ``d_k u_k`` relative to the centre, the edge vector to the next
    vertex, ``cross(v_k, v_{k+1})`` (twice the area of triangle k), the outer edge of triangle k
    as an oriented line (unit normal ``n`` and offset ``c``, so that ``cross(n, X) - c`` is the
    signed distance of ``X`` relative to the centre, positive on the centre's side) and the
    polygon's largest ray distance. A triangle with a zero-length outer edge has no interior; its
    offset is made so large that every point is far outside (finite, so that differences of
    distances stay defined). Rows come first so that every row is one contiguous (N, R) block.
    """
    n_polys, n_rays = dists.shape
    u = ray_directions(n_rays, dists.dtype, dists.device)
    table = torch.empty((9, n_polys, n_rays), dtype=dists.dtype, device=dists.device)
    py = torch.mul(dists, u[:, 0], out=table[_PY])
    px = torch.mul(dists, u[:, 1], out=table[_PX])
    ey = torch.sub(py.roll(-1, dims=1), py, out=table[_EY])
    ex = torch.sub(px.roll(-1, dims=1), px, out=table[_EX])
    torch.mul(dists * dists.roll(-1, dims=1), math.sin(2 * math.pi / n_rays), out=table[_TRI])
    table[_RMAX] = dists.amax(dim=1, keepdim=True) if n_polys else 0.0
    length = torch.sqrt(ey * ey + ex * ex)
    scale = table[_RMAX].clamp(min=1.0)
    degenerate = length <= torch.finfo(dists.dtype).eps * scale
    length.masked_fill_(degenerate, 1.0)
    ny = torch.div(ey, length, out=table[_NY])
    nx = torch.div(ex, length, out=table[_NX])
    table[_NC] = torch.where(degenerate, 1e6 * scale, _cross(ny, nx, py, px))
    return table


def intersection_areas(
    centres: torch.Tensor, table: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> torch.Tensor:
    """Exact intersection areas of the polygon pairs ``(first[p], second[p])``.

    Parameters
    ----------
    centres : torch.Tensor
        (N, 2) polygon centres.
    table : torch.Tensor
        (9, N, R) polygon tables from :func:`polygon_table`.
    first, second : torch.Tensor
        (P,) int64 polygon indices of each pair.

    Returns
    -------
    torch.Tensor
        (P,) areas in the dtype of ``table``.
    """
    result = table.new_empty(first.shape[0])
    for rows, offset, own, other, is_first in _directed_pairs(centres, table, first, second):
        # Pairs whose edges cross few rays are finished in the cheap first passes (both bounds
        # agree once no piece is left unknown); only the rest are followed further.
        area = result[rows]
        pending = torch.arange(area.numel(), device=area.device)
        for n_slots in (1, 2, None):
            lower, upper = _half_integral_bounds(offset, own, other, is_first, n_slots)
            area[pending] = _pair_sums(lower)
            open_half = lower != upper
            still_open = open_half[: pending.numel()] | open_half[pending.numel() :]
            if n_slots is None or not bool(still_open.any()):
                break
            pending = pending[still_open]
            both = torch.nonzero(torch.cat([still_open, still_open]), as_tuple=True)[0]
            offset, is_first = offset.index_select(0, both), is_first.index_select(0, both)
            own, other = own.index_select(1, both), other.index_select(1, both)
    return result


def intersection_exceeds(
    centres: torch.Tensor, table: torch.Tensor, first: torch.Tensor, second: torch.Tensor, limits: torch.Tensor
) -> torch.Tensor:
    """Whether the exact intersection area of each pair exceeds its limit.

    Arguments as in :func:`intersection_areas`, plus (P,) ``limits``. Cheaper than computing the
    areas when only the comparison matters: the edges are first followed only up to their first
    crossing of the other polygon's rays, then up to the second, which gives the exact area for
    most pairs and bounds on it for the rest; only pairs whose bounds straddle their limit are
    followed to the end.
    """
    result = torch.empty(first.shape[0], dtype=torch.bool, device=table.device)
    for rows, offset, own, other, is_first in _directed_pairs(centres, table, first, second):
        limit = limits[rows]
        pending = torch.arange(limit.numel(), device=limit.device)
        decided = torch.zeros(limit.numel(), dtype=torch.bool, device=limit.device)
        for n_slots in (1, 2, None):
            lower, upper = _half_integral_bounds(offset, own, other, is_first, n_slots)
            lower, upper = _pair_sums(lower), _pair_sums(upper)
            decided[pending] = lower > limit[pending]
            still_open = (lower <= limit[pending]) & (upper > limit[pending])
            if not bool(still_open.any()):
                break
            pending = pending[still_open]
            both = torch.nonzero(torch.cat([still_open, still_open]), as_tuple=True)[0]
            offset, is_first = offset.index_select(0, both), is_first.index_select(0, both)
            own, other = own.index_select(1, both), other.index_select(1, both)
        result[rows] = decided
    return result


def _pair_sums(halves: torch.Tensor) -> torch.Tensor:
    """Intersection areas from the two halves (first polygons' edges, then second ones')."""
    n = halves.shape[0] // 2
    return 0.5 * (halves[:n] + halves[n:])


def _chunk_size(device: torch.device, n_rays: int) -> int:
    """Polygon pairs per batch: on a CPU small enough for the temporaries (a few hundred
    kilobytes each) to stay in cache, on an accelerator large enough to fill it."""
    return max(256, (1 << 16) // n_rays) if device.type == "cpu" else max(1 << 14, (1 << 21) // n_rays)


def _directed_pairs(
    centres: torch.Tensor, table: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Chunks of pairs as ``2 n`` directed pairs, (first in second) then (second in first).

    Both halves of the boundary integral (edges of a inside b, edges of b inside a) are the same
    computation with the roles swapped, so they run as one batch. Yields the chunk's rows, own
    centre minus other centre, own and other tables and whether own is the first of its pair.
    """
    chunk = _chunk_size(table.device, table.shape[2])
    for lo in range(0, first.shape[0], chunk):
        hi = min(lo + chunk, first.shape[0])
        own = torch.cat([first[lo:hi], second[lo:hi]])
        other = torch.cat([second[lo:hi], first[lo:hi]])
        offset = centres.index_select(0, own) - centres.index_select(0, other)
        is_first = torch.arange(2 * (hi - lo), device=table.device) < hi - lo
        yield slice(lo, hi), offset, table.index_select(1, own), table.index_select(1, other), is_first


def _cross(ay: torch.Tensor, ax: torch.Tensor, by: torch.Tensor, bx: torch.Tensor) -> torch.Tensor:
    """z-component of the cross product of (x, y) vectors given as separate (y, x) components."""
    return ax * by - ay * bx


def _half_integral_bounds(
    offset: torch.Tensor,
    own: torch.Tensor,
    other: torch.Tensor,
    first: torch.Tensor,
    n_slots: int | None,
    resolve: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on one half of the boundary integral for a batch of directed pairs.

    The half is ``sum_k f_k * cross(v_k - o, e_k)`` over the own edges ``k`` (from vertex ``v_k``
    along ``e_k``), with ``f_k`` the fraction of the edge inside the other polygon and ``o`` the
    midpoint between the centres. Coordinates are taken relative to the other centre. Each edge is
    cut where it crosses the other polygon's rays; between two crossings it stays in one triangle
    of the other polygon, where the inside is one side of a line. Only the first ``n_slots``
    pieces of each edge are followed; what lies beyond is only known to be inside or outside,
    which gives the bounds. A piece lying on the other polygon's boundary is left unknown too
    (its contribution depends on the pair's other half), except with ``n_slots=None``: then every
    piece is followed and such pieces are resolved, so both bounds are the exact value.

    Parameters
    ----------
    offset : torch.Tensor
        (Q, 2) own centre minus other centre.
    own, other : torch.Tensor
        (9, Q, R) polygon tables (see :func:`polygon_table`).
    first : torch.Tensor
        (Q,) bool, True for the first polygon of its pair: an edge lying exactly on the other
        polygon's boundary counts only for the first polygon, so that it counts once.
    n_slots : int or None
        Pieces followed per edge.
    resolve : bool
        Resolve pieces on the other polygon's boundary (set when ``n_slots`` covers every piece).

    Returns
    -------
    lower, upper : torch.Tensor
        (Q,) bounds.
    """
    n_dir, n_rays = own.shape[1], own.shape[2]
    dtype, device = own.dtype, own.device
    if n_dir == 0:
        empty = own.new_zeros(0)
        return empty, empty
    oy, ox = offset[:, 0:1], offset[:, 1:2]
    vy, vx = own[_PY] + oy, own[_PX] + ox
    ey, ex = own[_EY], own[_EX]
    # Green's integrand of each edge about the midpoint o = own centre - offset / 2.
    weight = torch.addcmul(own[_TRI], ox, ey, value=0.5).addcmul_(oy, ex, value=-0.5)
    eps = torch.finfo(dtype).eps
    scale = (own[_RMAX, :, :1] + other[_RMAX, :, :1] + offset.abs().sum(dim=1, keepdim=True)).clamp_(min=1.0)

    # Triangle (sector) of the other polygon holding each own vertex (small integers, kept as
    # floats: integer arithmetic is slow on CPUs), the direction in which the edge turns about
    # the other centre (+1 counter-clockwise, -1 clockwise) and how many rays it crosses.
    sector = torch.floor_(torch.atan2(vy, vx).mul_(n_rays / (2 * math.pi)))
    sector.add_(sector < 0, alpha=n_rays)
    turn = torch.addcmul(vx * ey, vy, ex, value=-1.0)
    step = (turn >= 0).to(dtype).mul_(2.0).sub_(1.0)
    n_cross = (sector.roll(-1, dims=1) - sector).mul_(step)
    n_cross.add_(n_cross < 0, alpha=n_rays)
    # An edge lying along a ray of the other polygon (seen edge-on) crosses no ray, even where
    # rounding puts its ends in neighbouring sectors (whose triangles agree on that ray).
    edge_on = (turn.abs() <= 4 * eps * scale * scale) & (torch.addcmul(vy * (vy + ey), vx, vx + ex) > 0)
    n_cross.masked_fill_(edge_on, 0.0)
    if n_slots is None:
        # The cost grows with the pieces per edge: group the pairs by the most pieces any of
        # their edges needs, rounded up to a power of two.
        needed = n_cross.amax(dim=1).add_(1.0).log2_().ceil_().exp2_()
        lower, upper = torch.empty_like(weight[:, 0]), torch.empty_like(weight[:, 0])
        for group in torch.unique(needed).tolist():
            rows = torch.nonzero(needed == group, as_tuple=True)[0]
            lower[rows], upper[rows] = _half_integral_bounds(
                offset.index_select(0, rows),
                own.index_select(1, rows),
                other.index_select(1, rows),
                first.index_select(0, rows),
                int(group),
                resolve=True,
            )
        return lower, upper

    # Slots lead so that broadcasting over them keeps the long (pair, edge) axes innermost.
    slot = torch.arange(n_slots, dtype=dtype, device=device)[:, None, None]
    # Piece m of an edge lies in sector start + m * step; moving counter-clockwise it leaves a
    # sector s over ray s + 1, clockwise over ray s.
    piece_sector = torch.addcmul(sector, slot, step)
    piece_sector.add_(piece_sector < 0, alpha=n_rays).add_(piece_sector >= n_rays, alpha=-n_rays)
    exit_ray = piece_sector + (step > 0)
    exit_ray.masked_fill_(exit_ray == n_rays, 0.0)
    exit_ray = exit_ray.to(torch.int64)
    u = ray_directions(n_rays, dtype, device)
    ry, rx = u[:, 0].take(exit_ray), u[:, 1].take(exit_ray)
    denominator = torch.addcmul(rx * ey, ry, ex, value=-1.0)
    denominator.masked_fill_(denominator == 0, 1.0)
    t_hi = torch.addcmul(rx * vy, ry, vx, value=-1.0).div_(denominator).neg_().clamp_(0.0, 1.0)
    # The last piece ends at the edge's end; pieces beyond it are empty (from 1 to 1).
    t_hi.masked_fill_(slot >= n_cross, 1.0)
    t_lo = torch.cat([torch.zeros_like(t_hi[:1]), t_hi[:-1]])

    index = piece_sector.to(torch.int64).add_(torch.arange(0, n_dir * n_rays, n_rays, device=device)[:, None])
    ny, nx = other[_NY].reshape(-1).take(index), other[_NX].reshape(-1).take(index)
    line_c = other[_NC].reshape(-1).take(index)
    # Signed distances of the piece ends from their line (v + 1 * e may differ from the next
    # vertex by rounding, which the snapping below absorbs).
    end_y, end_x = torch.addcmul(vy, t_hi, ey), torch.addcmul(vx, t_hi, ex)
    start_y = torch.cat([vy[None], end_y[:-1]])
    start_x = torch.cat([vx[None], end_x[:-1]])
    h_lo = torch.addcmul(nx * start_y, ny, start_x, value=-1.0).sub_(line_c)
    h_hi = torch.addcmul(nx * end_y, ny, end_x, value=-1.0).sub_(line_c)
    # Distances within rounding of zero are on the line: snapping them makes coincident edges
    # recognisable instead of classifying them by rounding noise.
    tolerance = 64 * eps * scale
    h_lo.masked_fill_(h_lo.abs() <= tolerance, 0.0)
    h_hi.masked_fill_(h_hi.abs() <= tolerance, 0.0)

    # Fraction of the piece on the inner side of the line (0/0 only occurs on the line).
    fraction = torch.maximum(h_lo, h_hi).div_((h_lo - h_hi).abs_()).clamp_(0.0, 1.0)
    fraction.masked_fill_((h_lo >= 0) & (h_hi >= 0), 1.0)
    on_line = (h_lo == 0) & (h_hi == 0)
    fraction.masked_fill_(on_line, 0.0)
    length = (t_hi - t_lo).clamp_(min=0.0)
    unknown = 1.0 - t_hi[-1]
    if resolve:
        # A piece on the other polygon's boundary is part of the intersection's boundary only if
        # both run the same way, and then it must be counted for one polygon only.
        fraction.add_(on_line & (torch.addcmul(ny * ey, nx, ex) > 0) & first[:, None])
    else:
        unknown = unknown + (length * on_line).sum(dim=0)
    known = length.mul_(fraction).sum(dim=0).mul_(weight)
    unknown = unknown.mul_(weight)
    return (known + unknown.clamp(max=0.0)).sum(dim=1), (known + unknown.clamp(min=0.0)).sum(dim=1)


# Upper bound on the (polygon, pixel) tests of one rendering batch, to bound memory.
_RENDER_BATCH = 1 << 22


def polygons_to_labels(
    points: ArrayOrTensor, dists: ArrayOrTensor, probs: ArrayOrTensor, shape: tuple[int, int],
    rows: tuple[int, int] | None = None,
) -> ArrayOrTensor:
    """Render polygons into a label image, higher probabilities on top.

    A pixel belongs to a polygon when its centre (integer coordinates ``(y, x)``) lies inside the
    polygon or on its boundary, tested exactly (up to a relative 1e-9 for rounding) in the
    polygon's triangle that holds the pixel's angle; a triangle with two zero-length rays is
    empty. Where polygons overlap, the one with the higher probability wins.

    Parameters
    ----------
    points : np.ndarray or torch.Tensor
        (K, 2) centres ``(y, x)``.
    dists : np.ndarray or torch.Tensor
        (K, R) ray distances.
    probs : np.ndarray or torch.Tensor
        (K,) probabilities.
    shape : tuple of int
        ``(H, W)`` of the label image.
    rows : (start, stop), optional
        Render only these rows (a strip of a large image, rendered strip by strip with bounded
        memory); the strip equals the same rows of the whole rendering.

    Returns
    -------
    np.ndarray or torch.Tensor
        int32 (H, W) label image (``(stop - start, W)`` with ``rows``), of the same kind as
        ``dists``: 0 is background and polygon ``k`` gets the label ``1 + `` its rank in order of
        decreasing probability (ties by index).
    """
    d = _as_tensor(dists, torch.float64)
    device = d.device
    c = _as_tensor(points, torch.float64, device)
    p = torch.as_tensor(probs, device=device)
    _check_polygons(c, d)
    if p.shape != (c.shape[0],):
        raise ValueError(f"probs must have shape ({c.shape[0]},), got {tuple(p.shape)}")
    height, width = (int(s) for s in shape)
    first, stop = render_range(rows, height)
    n_rays = d.shape[1]
    rank = torch.empty(c.shape[0], dtype=torch.int64, device=device)
    rank[torch.sort(p, descending=True, stable=True).indices] = torch.arange(c.shape[0], device=device)

    u = ray_directions(n_rays, device=device)
    vertices = c[:, None, :] + d[:, :, None] * u
    lo = torch.ceil(vertices.amin(dim=1)).to(torch.int64).clamp(min=0)
    hi = torch.floor(vertices.amax(dim=1)).to(torch.int64)
    lo[:, 0].clamp_(min=first)
    hi[:, 0].clamp_(max=stop - 1)
    hi[:, 1].clamp_(max=width - 1)
    extent = (hi - lo + 1).clamp(min=0)
    counts = extent[:, 0] * extent[:, 1]
    height = stop - first

    winner = torch.full((height * width,), c.shape[0], dtype=torch.int64, device=device)
    batches = torch.div(torch.cumsum(counts, 0) - counts, _RENDER_BATCH, rounding_mode="floor")
    for batch in torch.unique(batches).tolist():
        members = torch.nonzero(batches == batch, as_tuple=True)[0]
        poly = torch.repeat_interleave(members, counts[members])
        starts = torch.cumsum(counts[members], 0) - counts[members]
        local = torch.arange(poly.numel(), device=device) - starts.repeat_interleave(counts[members])
        row = lo[poly, 0] + torch.div(local, extent[poly, 1], rounding_mode="floor")
        col = lo[poly, 1] + local % extent[poly, 1]
        inside = _contains(c.index_select(0, poly), d, poly, row.to(torch.float64), col.to(torch.float64), u)
        winner.scatter_reduce_(0, ((row - first) * width + col)[inside], rank[poly[inside]], "amin")
    labels = torch.where(winner < c.shape[0], winner + 1, 0).to(torch.int32).reshape(height, width)
    return _like(labels, dists)


def _contains(
    centres: torch.Tensor,
    dists: torch.Tensor,
    polygon: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:
    """Whether each point ``(y[i], x[i])`` lies in polygon ``polygon[i]`` (closed, float64).

    ``centres`` holds the centre of each point's polygon, ``dists`` the rays of all polygons.
    """
    n_rays = dists.shape[1]
    py, px = y - centres[:, 0], x - centres[:, 1]
    sector = torch.floor(torch.atan2(py, px) * (n_rays / (2 * math.pi))).to(torch.int64) % n_rays
    following = (sector + 1) % n_rays
    flat = dists.reshape(-1)
    d0 = flat.take(polygon * n_rays + sector)
    d1 = flat.take(polygon * n_rays + following)
    # With p = a * u_k + b * u_{k+1} (a, b >= 0 in sector k), p is in the triangle
    # (0, d_k u_k, d_{k+1} u_{k+1}) iff a d_{k+1} + b d_k <= d_k d_{k+1}, a <= d_k and b <= d_{k+1}
    # (the last two only matter when a ray has length zero and the triangle is a segment). Here
    # a and b are scaled by sin(2 pi / R), which saves the divisions; the slack absorbs rounding.
    sin = math.sin(2 * math.pi / n_rays)
    a = _cross(py, px, u[following, 0], u[following, 1])
    b = _cross(u[sector, 0], u[sector, 1], py, px)
    bound = d0 * d1 * sin
    slack = 1e-9 * (d0 + d1 + 1.0)
    inside = (a * d1 + b * d0 <= bound + slack * (d0 + d1)) & (a <= d0 * sin + slack) & (b <= d1 * sin + slack)
    return inside & (torch.maximum(d0, d1) > 0)


def render_range(planes: tuple[int, int] | None, size: int) -> tuple[int, int]:
    """``(start, stop)`` of the first axis to render (all of it for None)."""
    if planes is None:
        return 0, size
    start, stop = (int(v) for v in planes)
    if not 0 <= start <= stop <= size:
        raise ValueError(f"the range to render must satisfy 0 <= start <= stop <= {size}, got {tuple(planes)}")
    return start, stop
