"""Training targets of StarDist 2D: star distances and object probabilities.

Conventions
-----------
Images are indexed ``(row, column)`` = ``(y, x)``. Ray ``k`` of ``n_rays`` points at the angle
``phi_k = 2 * pi * k / n_rays`` and has the direction ``(dy, dx) = (sin(phi_k), cos(phi_k))``: ray 0
points along +x (to the right), ray ``n_rays / 4`` along +y (down the rows).

Star distances follow the reference StarDist implementation (``stardist/lib/stardist2d.cpp``)
step by step, so that models trained on these targets behave like the reference ones:

* the ray direction is computed in float32 from the float32 angle ``k * float32(2 pi / n_rays)``;
* the ray is walked in steps of Euclidean length one, accumulating the position in float32, and
  each step's position is rounded half-to-even to a pixel;
* the walk stops at the first step ``n`` whose pixel lies outside the image or carries a label
  other than the start pixel's;
* the overshoot is corrected: the final position ``n * (dy, dx)`` is pulled back by
  ``1 - 0.5 / max(|dy|, |dx|)`` of a step, i.e. to half a pixel (along the dominant axis) past the
  last sample that was still inside, and the distance is the Euclidean length of that position.

One deliberate difference: the reference rounds ``start + offset`` in float32, which makes the
rounding of offsets that lie within float32 precision of a half integer depend on the absolute
start coordinate. Here the offset alone is rounded, so the result is translation invariant; the
two agree except in those rare near-tie samples. The reference also casts labels to uint16, which
merges labels that are equal modulo 65536; here labels of any integer size are kept apart.

The walk is vectorised over all pixels of all objects of similar size at once: each object is cut
out as a binary mask of its bounding box, and for each ray and step one slice comparison advances
every start pixel of every object in the batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence, TypeVar

import numpy as np
import torch
from scipy import ndimage

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)

# Crop sides are rounded up to this ladder so that objects of similar size share one batched
# walk: fewer rungs mean fewer (per-step, overhead-bound) walks but more padded area per walk.
_SIZE_LADDER = (16, 32, 64, 128, 256, 512, 1024)
# Upper bound on the elements of one batch of crops, to bound memory for huge objects.
_MAX_BATCH_ELEMENTS = 1 << 24


def _normalize_grid(grid: Sequence[int]) -> tuple[int, int]:
    values = tuple(int(g) for g in grid)
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"grid must be two positive integers, got {tuple(grid)}")
    return values[0], values[1]


def _as_label_tensor(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        tensor = labels
    else:
        array = np.asarray(labels)
        # Unsigned arrays are widened here: torch supports few operations on unsigned types.
        unsigned = np.issubdtype(array.dtype, np.unsignedinteger)
        tensor = torch.from_numpy(array.astype(np.int64) if unsigned else array)
    if tensor.ndim != 2:
        raise ValueError(f"labels must be a 2D label image, got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {tensor.dtype}")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError("labels must be non-negative (0 is background)")
    return tensor.to(torch.int64)


def _compact_labels(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map the labels to 0 (background) and 1..K in increasing order of the original label."""
    if labels.numel() == 0:
        return labels.clone(), 0
    max_label = int(labels.max())
    if max_label <= 4 * labels.numel() + 1024:
        # A lookup table is linear time and avoids the sort of torch.unique.
        present = torch.zeros(max_label + 1, dtype=torch.bool, device=labels.device)
        present[labels.reshape(-1)] = True
        present[0] = False
        lut = torch.cumsum(present, 0) * present
        return lut[labels], int(present.sum())
    values, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    if int(values[0]) != 0:
        return inverse + 1, int(values.numel())
    return inverse, int(values.numel()) - 1


def _bounding_boxes(compact: torch.Tensor, n_objects: int) -> torch.Tensor:
    """Per-object ``(ymin, ymax, xmin, xmax)`` (inclusive) of a compact label image, shape (K, 4)."""
    height, width = compact.shape
    flat = compact.reshape(-1)
    where = torch.nonzero(flat, as_tuple=True)[0]
    obj = flat[where] - 1
    rows = torch.div(where, width, rounding_mode="floor")
    cols = where - rows * width
    device = compact.device
    boxes = torch.empty((n_objects, 4), dtype=torch.int64, device=device)
    boxes[:, 0] = torch.full((n_objects,), height, device=device).scatter_reduce(0, obj, rows, "amin")
    boxes[:, 1] = torch.full((n_objects,), -1, device=device).scatter_reduce(0, obj, rows, "amax")
    boxes[:, 2] = torch.full((n_objects,), width, device=device).scatter_reduce(0, obj, cols, "amin")
    boxes[:, 3] = torch.full((n_objects,), -1, device=device).scatter_reduce(0, obj, cols, "amax")
    return boxes


def _ray_walk_tables(n_rays: int, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets of every step and the corrected distance for every exit step.

    Returns
    -------
    offsets : np.ndarray
        int64 array (n_rays, n_steps + 1, 2); ``offsets[k, n]`` is the rounded ``(dy, dx)`` offset of
        step ``n`` along ray ``k`` (row 0 is the start, offset zero).
    exit_dists : np.ndarray
        float32 array (n_rays, n_steps + 1); ``exit_dists[k, n]`` is the star distance when step
        ``n`` is the first one outside the object (index 0 is unused and 0).
    """
    step_angle = np.float32(2.0 * math.pi / n_rays)
    phi = np.arange(n_rays, dtype=np.float32) * step_angle
    # Correctly rounded float32 sine and cosine of the float32 angle (as the C library computes).
    dy = np.sin(phi.astype(np.float64)).astype(np.float32)
    dx = np.cos(phi.astype(np.float64)).astype(np.float32)
    # Sequential float32 accumulation, step by step, exactly as the reference walks the ray.
    y = np.zeros((n_rays, n_steps + 1), np.float32)
    x = np.zeros((n_rays, n_steps + 1), np.float32)
    y[:, 1:] = np.add.accumulate(np.broadcast_to(dy[:, None], (n_rays, n_steps)), axis=1, dtype=np.float32)
    x[:, 1:] = np.add.accumulate(np.broadcast_to(dx[:, None], (n_rays, n_steps)), axis=1, dtype=np.float32)
    offsets = np.stack([np.rint(y), np.rint(x)], axis=-1).astype(np.int64)

    pull_back = np.float32(0.5) / np.maximum(np.abs(dy), np.abs(dx)) - np.float32(1.0)
    y_end = y + (pull_back * dy)[:, None]
    x_end = x + (pull_back * dx)[:, None]
    exit_dists = np.sqrt(y_end * y_end + x_end * x_end).astype(np.float32)
    exit_dists[:, 0] = 0.0
    return offsets, exit_dists


def _crop_size(size: int, step: int) -> int:
    """Smallest rung of the size ladder that holds ``size`` pixels and is ``1 (mod step)``."""
    rung = next((r for r in _SIZE_LADDER if r >= size), size)
    return -(-(rung - 1) // step) * step + 1


@dataclass(frozen=True)
class _Symmetry:
    """A symmetry of the square (transpose, then flip rows, then flip columns) of a crop."""

    swap: bool
    flip_y: bool
    flip_x: bool

    def map_offsets(self, offsets: np.ndarray) -> np.ndarray:
        """The offsets ``(dy, dx)`` as seen in the transformed crop."""
        mapped = offsets[..., ::-1] if self.swap else offsets
        return mapped * np.array([-1 if self.flip_y else 1, -1 if self.flip_x else 1])

    def forward(self, array: torch.Tensor) -> torch.Tensor:
        """Transform the two leading (spatial) dimensions of ``array``."""
        if self.swap:
            array = array.transpose(0, 1)
        dims = [d for d, flip in ((0, self.flip_y), (1, self.flip_x)) if flip]
        return array.flip(dims) if dims else array

    def map_points(
        self, rows: torch.Tensor, cols: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the points ``(rows, cols)`` of a ``height x width`` array land under :meth:`forward`."""
        if self.swap:
            rows, cols, height, width = cols, rows, width, height
        if self.flip_y:
            rows = height - 1 - rows
        if self.flip_x:
            cols = width - 1 - cols
        return rows, cols


def _ray_groups(offsets: np.ndarray, allow_swap: bool) -> list[tuple[int, list[tuple[int, _Symmetry]]]]:
    """Group rays whose step offsets are exact mirror images of one walked ("canonical") ray.

    A ray that is the mirror image of a canonical ray under a symmetry of the square gives the
    same counts as the canonical ray walked over the mirrored crop, so all members of a group are
    walked in one batched pass. Membership is decided on the exact integer offset tables, so the
    grouping never changes a result; a ray whose float32 offsets break the symmetry simply becomes
    a canonical ray of its own.
    """
    symmetries = [
        _Symmetry(swap, flip_y, flip_x)
        for swap in ((False, True) if allow_swap else (False,))
        for flip_y in (False, True)
        for flip_x in (False, True)
    ]
    groups: list[tuple[int, list[tuple[int, _Symmetry]]]] = []
    for ray in range(offsets.shape[0]):
        for canonical, members in groups:
            match = next(
                (sym for sym in symmetries if np.array_equal(sym.map_offsets(offsets[ray]), offsets[canonical])),
                None,
            )
            if match is not None:
                members.append((ray, match))
                break
        else:
            groups.append((ray, [(ray, _Symmetry(False, False, False))]))
    return groups


@functools.lru_cache(maxsize=64)
def _walk_plan(n_rays: int, n_steps: int, allow_swap: bool):
    """Step tables and ray groups for a walk (cached: every training batch needs the same ones)."""
    offsets, exit_dists = _ray_walk_tables(n_rays, n_steps)
    groups = _ray_groups(offsets, allow_swap)
    offsets.setflags(write=False)
    return offsets, torch.from_numpy(exit_dists), groups


def _walk(
    masks: torch.Tensor, sizes: list[int], n_sym: int, step: tuple[int, int], offsets: np.ndarray
) -> torch.Tensor:
    """Count, for every start pixel, the steps of one ray that stay inside its object.

    Parameters
    ----------
    masks : torch.Tensor
        uint8 (S, S, B * n_sym): object masks of equally sized crops, batch last so that each row
        slice is one contiguous run; object-major (the ``n_sym`` mirrored copies of an object are
        adjacent) and objects sorted by decreasing ``sizes``.
    sizes : list of int
        Bounding-box extent (larger side) of each object, decreasing.
    n_sym : int
        Number of mirrored copies per object.
    step : tuple of int
        Lattice spacing ``(gy, gx)`` of the start pixels; crops start on the lattice.
    offsets : np.ndarray
        int64 (n_steps + 1, 2) step offsets of the ray.

    Returns
    -------
    torch.Tensor
        (hs, ws, B * n_sym) counts (meaningless where the start pixel is not in the object).
    """
    if masks.device.type == "cpu":
        # The walk is many small slice operations: NumPy's cost several times less per call than
        # torch's (a StarDist training batch: 14 instead of 18 ms), on the same memory.
        return torch.from_numpy(_walk_steps(masks.numpy(), sizes, n_sym, step, offsets))
    return _walk_steps(masks, sizes, n_sym, step, offsets)


def _walk_steps(masks, sizes: list[int], n_sym: int, step: tuple[int, int], offsets: np.ndarray):
    """:func:`_walk` on a NumPy array or a tensor (the result is of the same kind)."""
    gy, gx = step
    crop_h, crop_w = masks.shape[:2]
    # uint8 counters would wrap after 255 steps; only crops that long need a wider type.
    wide = max(crop_h, crop_w) >= 170
    if isinstance(masks, np.ndarray):
        alive = masks[::gy, ::gx].copy()
        count = np.zeros(alive.shape, dtype=np.int32 if wide else np.uint8)
    else:
        alive = masks[::gy, ::gx].clone()
        count = torch.zeros_like(alive, dtype=torch.int32 if wide else torch.uint8)
    hs, ws = alive.shape[:2]
    n_live = len(sizes)
    for oy, ox in offsets[1:].tolist():
        # Objects whose box is no longer than this step's offset have left their box for good.
        reach = max(abs(oy), abs(ox))
        while n_live and sizes[n_live - 1] <= reach:
            n_live -= 1
        # Starts whose sample stays inside the crop: 0 <= gy * a + oy < crop_h (same for x). The
        # ranges shrink monotonically with the step, so starts that drop out keep their count.
        a_lo, a_hi = max(0, -(oy // gy)), min(hs, -((oy - crop_h) // gy))
        b_lo, b_hi = max(0, -(ox // gx)), min(ws, -((ox - crop_w) // gx))
        if n_live == 0 or a_lo >= a_hi or b_lo >= b_hi:
            break
        batch = n_live * n_sym
        live = alive[a_lo:a_hi, b_lo:b_hi, :batch]
        rows = slice(gy * a_lo + oy, gy * (a_hi - 1) + oy + 1, gy)
        cols = slice(gx * b_lo + ox, gx * (b_hi - 1) + ox + 1, gx)
        live &= masks[rows, cols, :batch]
        counted = count[a_lo:a_hi, b_lo:b_hi, :batch]
        counted += live
    return count


def star_distances(
    labels: ArrayOrTensor, n_rays: int = 32, grid: Sequence[int] = (1, 1)
) -> ArrayOrTensor:
    """Distances from each pixel to its object's boundary along ``n_rays`` rays.

    Parameters
    ----------
    labels : np.ndarray or torch.Tensor
        2D integer label image; 0 is background, any positive value one object (values need not be
        consecutive and may exceed 65535).
    n_rays : int
        Number of rays, equally spaced in angle starting at +x (see the module docstring for the
        direction convention and the exact walking rule).
    grid : tuple of int
        Subsampling ``(gy, gx)``: distances are computed for the pixels ``(i * gy, j * gx)`` only.

    Returns
    -------
    np.ndarray or torch.Tensor
        float32 array of shape ``(ceil(H / gy), ceil(W / gx), n_rays)``, of the same kind as
        ``labels`` (a tensor stays on its device). Background pixels get 0.
    """
    if int(n_rays) < 3:
        raise ValueError(f"n_rays must be at least 3, got {n_rays}")
    n_rays = int(n_rays)
    gy, gx = _normalize_grid(grid)
    tensor = _as_label_tensor(labels)
    height, width = tensor.shape
    out_h, out_w = -(-height // gy), -(-width // gx)
    out = torch.zeros((out_h * out_w, n_rays), dtype=torch.float32, device=tensor.device)

    compact, n_objects = _compact_labels(tensor)
    if n_objects:
        boxes = _bounding_boxes(compact, n_objects).cpu()
        # Crops start on the sampling lattice so that the lattice pixels of a crop are the start
        # pixels, and are square with side = 1 (mod gy and gx) so that mirroring maps the lattice
        # onto itself.
        y0 = boxes[:, 0] // gy * gy
        x0 = boxes[:, 2] // gx * gx
        extent = torch.maximum(boxes[:, 1] + 1 - y0, boxes[:, 3] + 1 - x0)
        lattice = math.lcm(gy, gx)
        side = torch.tensor([_crop_size(int(e), lattice) for e in extent.tolist()])
        n_steps = int(math.ceil(int(side.max()) / math.cos(math.pi / 4))) + 2
        offsets, exit_table, groups = _walk_plan(n_rays, n_steps, gy == gx)
        exit_table = exit_table.to(tensor.device)
        # Objects that leave their box are dropped from the batch, so sort by decreasing size.
        size = torch.maximum(boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]) + 1
        for crop_side in torch.unique(side).tolist():
            members = torch.nonzero(side == crop_side, as_tuple=True)[0]
            members = members[torch.argsort(size[members], descending=True, stable=True)]
            per_chunk = max(1, _MAX_BATCH_ELEMENTS // (crop_side * crop_side * 8))
            for chunk in members.split(per_chunk):
                _star_distances_of_batch(
                    compact, chunk, y0[chunk], x0[chunk], size[chunk].tolist(), crop_side,
                    (gy, gx), offsets, groups, exit_table, out, out_w,
                )

    result = out.reshape(out_h, out_w, n_rays)
    return result if isinstance(labels, torch.Tensor) else result.numpy()


def star_distances_batch(labels: torch.Tensor, n_rays: int = 32, grid: Sequence[int] = (1, 1)) -> torch.Tensor:
    """:func:`star_distances` of a batch of label images ``(N, H, W)``, in one pass.

    The images are laid side by side with a column of background between neighbours (as wide as
    needed to keep the sampling lattice aligned) and their labels made distinct, then walked
    together. A ray step moves at most one pixel along each axis, so every ray that leaves an
    image lands on the separating background first and stops exactly where it would stop at the
    image border: the result equals the images' separate star distances, for the per-step cost
    of one image. Returns ``(N, ceil(H / gy), ceil(W / gx), n_rays)`` on the labels' device.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be a batch (N, H, W) of label images, got shape {tuple(labels.shape)}")
    gy, gx = _normalize_grid(grid)
    n, height, width = labels.shape
    if n == 1:
        return star_distances(labels[0], n_rays, grid)[None]
    labels = _as_label_tensor(labels.reshape(n * height, width)).reshape(n, height, width)
    gap = gx - width % gx if width % gx else gx
    stride = width + gap
    shift = torch.cumsum(labels.reshape(n, -1).amax(dim=1), 0) - labels.reshape(n, -1).amax(dim=1)
    mosaic = torch.zeros((height, n * stride - gap), dtype=torch.int64, device=labels.device)
    for i in range(n):
        lab = labels[i]
        mosaic[:, i * stride:i * stride + width] = torch.where(lab > 0, lab + shift[i], lab)
    dists = star_distances(mosaic, n_rays, grid)
    out_w = -(-width // gx)
    return torch.stack([dists[:, i * stride // gx:i * stride // gx + out_w] for i in range(n)])


def _star_distances_of_batch(
    compact: torch.Tensor,
    objects: torch.Tensor,
    y0: torch.Tensor,
    x0: torch.Tensor,
    sizes: list[int],
    side: int,
    step: tuple[int, int],
    offsets: np.ndarray,
    groups: list[tuple[int, list[tuple[int, _Symmetry]]]],
    exit_table: torch.Tensor,
    out: torch.Tensor,
    out_w: int,
) -> None:
    """Star distances of a batch of objects cut out as ``side x side`` crops, written to ``out``."""
    height, width = compact.shape
    device = compact.device
    gy, gx = step
    objects, y0, x0 = objects.to(device), y0.to(device), x0.to(device)
    span = torch.arange(side, device=device)
    rows = (y0[None, :] + span[:, None])[:, None, :]
    cols = (x0[None, :] + span[:, None])[None, :, :]
    inside = (rows < height) & (cols < width)
    crops = compact.reshape(-1)[(rows.clamp(max=height - 1) * width + cols.clamp(max=width - 1)).reshape(-1)]
    masks = ((crops.reshape(side, side, -1) == objects + 1) & inside).to(torch.uint8)

    starts = masks[::gy, ::gx]
    hs, ws, n_obj = starts.shape
    start_index = torch.nonzero(starts.reshape(-1), as_tuple=True)[0]
    a = torch.div(start_index, ws * n_obj, rounding_mode="floor")
    b = torch.div(start_index, n_obj, rounding_mode="floor") % ws
    obj = start_index % n_obj
    # Where each start pixel lands in a mirrored crop, as a flat index into (hs, ws, n_obj).
    mirrored_index: dict[_Symmetry, torch.Tensor] = {}
    dists = torch.empty((exit_table.shape[0], start_index.numel()), dtype=torch.float32, device=device)
    for canonical, members in groups:
        mirrored = torch.stack([sym.forward(masks) for _, sym in members], dim=-1)
        counts = _walk(mirrored.reshape(side, side, -1), sizes, len(members), step, offsets[canonical])
        counts = counts.reshape(-1)
        for index, (ray, sym) in enumerate(members):
            if sym not in mirrored_index:
                ma, mb = sym.map_points(a, b, hs, ws)
                mirrored_index[sym] = (ma * ws + mb) * n_obj + obj
            inside_steps = counts.index_select(0, mirrored_index[sym] * len(members) + index).long()
            # The walk exits at the first step outside: one more than the steps inside.
            dists[ray] = exit_table[ray, 1:].index_select(0, inside_steps)

    flat = (y0[obj] // gy + a) * out_w + (x0[obj] // gx + b)
    out.index_copy_(0, flat, dists.T.contiguous())


def object_probabilities(labels: ArrayOrTensor, grid: Sequence[int] = (1, 1)) -> ArrayOrTensor:
    """Normalised Euclidean distance transform of every object (StarDist's object probability).

    Each pixel of an object gets its Euclidean distance to the nearest pixel that does not belong
    to the object (background or another label), divided by the maximum of that distance over the
    object, so every object peaks at 1; background is 0. As in the reference implementation, the
    image border does not count as background: an object cut by the border is measured only
    against the pixels inside the image. The one exception, also as in the reference, is an image
    that is a single object without any background, which is treated as if surrounded by
    background (otherwise the distance would be undefined).

    Parameters
    ----------
    labels : np.ndarray or torch.Tensor
        2D integer label image, 0 = background.
    grid : tuple of int
        Subsampling ``(gy, gx)``: the result is the full-resolution map sampled at
        ``(i * gy, j * gx)``.

    Returns
    -------
    np.ndarray or torch.Tensor
        float32 array of shape ``(ceil(H / gy), ceil(W / gx))`` of the same kind as ``labels`` (a
        tensor is computed on the CPU with SciPy and returned on its device).
    """
    gy, gx = _normalize_grid(grid)
    tensor = _as_label_tensor(labels)
    compact, n_objects = _compact_labels(tensor.cpu())
    image = compact.numpy()
    prob = np.zeros(image.shape, np.float32)
    if n_objects == 1 and bool((image > 0).all()):
        prob = _normalised_edt(np.pad(image > 0, 1))[1:-1, 1:-1]
    elif n_objects:
        height, width = image.shape
        for index, box in enumerate(ndimage.find_objects(image), start=1):
            if box is None:
                continue
            # One pixel of context where the box does not touch the image border, so the
            # neighbouring background/labels are seen; at the border there is nothing to see.
            rows = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, height))
            cols = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, width))
            mask = image[rows, cols] == index
            prob[rows, cols][mask] = _normalised_edt(mask)[mask]
    result = prob[::gy, ::gx]
    if isinstance(labels, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(result)).to(labels.device)
    return np.ascontiguousarray(result)


def _normalised_edt(mask: np.ndarray) -> np.ndarray:
    edt = ndimage.distance_transform_edt(mask).astype(np.float32)
    peak = edt.max()
    return edt / peak if peak > 0 else edt
