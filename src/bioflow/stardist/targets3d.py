"""Training targets of StarDist 3D: star distances along 3D rays and object probabilities.

Conventions
-----------
Label volumes are indexed ``(z, y, x)``; rays are those of :mod:`bioflow.stardist.rays3d` (unit
directions in voxel space, reference order). Outputs are ``(Z', Y', X', R)`` with
``Z' = ceil(Z / gz)`` etc. for a grid ``(gz, gy, gx)``: entry ``(i, j, k)`` belongs to the voxel
``(i gz, j gy, k gx)``.

Star distances follow the reference StarDist 3D implementation step by step:

* the ray is walked in steps of length one, accumulating the position in float32, and each
  step's offset is rounded half-to-even to a voxel offset;
* the walk stops at the first step ``n`` whose voxel lies outside the volume or carries a label
  other than the start voxel's;
* the distance is the Euclidean length of that step's rounded offset (the first voxel outside,
  in voxel units; unlike the 2D reference there is no half-pixel correction in 3D).

As in 2D, two deliberate differences: the reference rounds ``start + offset`` in float32, which
makes offsets within float32 precision of a half integer round depending on the absolute start
coordinate; here the offset alone is rounded, so the result is translation invariant (the bench
reports how rarely the two differ). The reference casts labels to uint16; here labels of any
integer size stay apart.

The walk is vectorised per ray over all start voxels of all objects at once: the active starts
are a list of indices into the label volume (padded with background so that no bounds checks are
needed); each step gathers the labels at the next offset, records the distance of the starts that
leave their object and drops them, so the work is proportional to the summed ray lengths. On the
CPU the rays are spread over the intra-op threads, a whole ray per thread at a time
(:func:`bioflow.threads.map_on_threads`): beside another job this loses about half as much as
splitting every operation over the threads, and it is faster on a quiet machine too.

Object probabilities are the per-object Euclidean distance transform with the voxel anisotropy as
sampling, normalised to a maximum of 1 per object (the reference's ``edt_prob``).
"""

from __future__ import annotations

import functools
from typing import Sequence, TypeVar

import numpy as np
import torch
from scipy import ndimage

from bioflow.stardist.rays3d import Rays3D, normalize_anisotropy
from bioflow.stardist.targets import _compact_labels
from bioflow.threads import map_on_threads

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)

# Starts processed together: bounds the memory of the active lists for huge volumes.
_MAX_STARTS = 1 << 22
# Steps gathered per pass of the walk: the first pass is short (many walks end within a few
# steps), later ones grow as the walks that are still going tend to be long.
_FIRST_CHUNK, _MAX_CHUNK = 8, 16


def normalize_grid_3d(grid: Sequence[int]) -> tuple[int, int, int]:
    """``(gz, gy, gx)`` as three positive ints (ValueError otherwise)."""
    values = tuple(int(g) for g in grid)
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"grid must be three positive integers (z, y, x), got {tuple(grid)}")
    return values  # type: ignore[return-value]


def _as_label_volume(labels: np.ndarray | torch.Tensor, ndim: int = 3) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        tensor = labels
    else:
        array = np.asarray(labels)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"labels must have an integer dtype, got {array.dtype}")
        tensor = torch.from_numpy(array.astype(np.int64))
    if tensor.ndim != ndim:
        what = "a 3D label volume (Z, Y, X)" if ndim == 3 else "a batch (N, Z, Y, X) of label volumes"
        raise ValueError(f"labels must be {what}, got shape {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {tensor.dtype}")
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError("labels must be non-negative (0 is background)")
    return tensor.to(torch.int64)


def _rays_vertices(rays: Rays3D | np.ndarray) -> np.ndarray:
    vertices = np.asarray(rays.vertices if isinstance(rays, Rays3D) else rays, dtype=np.float32)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or vertices.shape[0] < 1:
        raise ValueError(f"rays must be (R, 3) directions (z, y, x), got shape {vertices.shape}")
    return vertices


@functools.lru_cache(maxsize=32)
def _walk_tables(vertices: bytes, n_rays: int, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Rounded offsets (R, n_steps + 1, 3) of every step and their lengths (R, n_steps + 1).

    The position is accumulated sequentially in float32, as the reference walks the ray.
    """
    directions = np.frombuffer(vertices, dtype=np.float32).reshape(n_rays, 3)
    position = np.zeros((n_rays, n_steps + 1, 3), np.float32)
    position[:, 1:] = np.add.accumulate(
        np.broadcast_to(directions[:, None, :], (n_rays, n_steps, 3)), axis=1, dtype=np.float32
    )
    offsets = np.rint(position).astype(np.int64)
    lengths = np.sqrt((offsets * offsets).sum(axis=-1).astype(np.float32))
    offsets.setflags(write=False)
    lengths.setflags(write=False)
    return offsets, lengths


def star_distances_3d(
    labels: ArrayOrTensor, rays: Rays3D, grid: Sequence[int] = (1, 1, 1)
) -> ArrayOrTensor:
    """Distances from each voxel to its object's boundary along every ray.

    Parameters
    ----------
    labels : np.ndarray or torch.Tensor
        (Z, Y, X) integer label volume; 0 is background, any positive value one object (values
        need not be consecutive and may exceed 65535).
    rays : Rays3D
        Ray directions (e.g. :func:`~bioflow.stardist.rays3d.golden_spiral_rays`).
    grid : tuple of int
        Subsampling ``(gz, gy, gx)``: distances are computed for the voxels ``(i gz, j gy, k gx)``.

    Returns
    -------
    np.ndarray or torch.Tensor
        float32 ``(ceil(Z / gz), ceil(Y / gy), ceil(X / gx), R)`` of the same kind as ``labels``
        (a tensor stays on its device); background voxels get 0. Distances are in voxels along
        the (unit, voxel-space) ray directions.
    """
    gz, gy, gx = normalize_grid_3d(grid)
    vertices = _rays_vertices(rays)
    tensor = _as_label_volume(labels)
    device = tensor.device
    depth, height, width = tensor.shape
    out_shape = (-(-depth // gz), -(-height // gy), -(-width // gx))
    n_rays = vertices.shape[0]
    out = torch.zeros((*out_shape, n_rays), dtype=torch.float32, device=device)

    compact, n_objects = _compact_labels(tensor)
    if n_objects:
        # Enough steps to leave any object: at most the box diagonal plus one.
        n_steps = int(np.ceil(np.sqrt(depth**2 + height**2 + width**2))) + 2
        offsets, lengths = _walk_tables(vertices.tobytes(), n_rays, n_steps)
        # A background frame stops every ray at the volume border (a step moves the rounded
        # position by at most one voxel along each axis); it is as wide as a chunk of steps, so
        # that the look-ups of a chunk past a walk's exit stay inside the padded volume.
        m = _MAX_CHUNK
        padded = torch.nn.functional.pad(compact.to(torch.int32), (m,) * 6)
        strides = torch.tensor([(height + 2 * m) * (width + 2 * m), width + 2 * m, 1], dtype=torch.int64)
        sampled = compact[::gz, ::gy, ::gx]
        starts = torch.nonzero(sampled.reshape(-1), as_tuple=True)[0]
        sz, sy, sx = sampled.shape
        coords = torch.stack(
            [
                torch.div(starts, sy * sx, rounding_mode="floor") * gz,
                torch.div(starts, sx, rounding_mode="floor") % sy * gy,
                starts % sx * gx,
            ],
            dim=1,
        )
        start_lin = ((coords + m) * strides.to(device)).sum(dim=1)
        start_lab = padded.reshape(-1).take(start_lin)
        linear = torch.from_numpy((offsets * strides.numpy()).sum(axis=-1)).to(device)
        dists = torch.empty((n_rays, starts.numel()), dtype=torch.float32, device=device)
        lengths_t = torch.from_numpy(lengths.copy()).to(device)
        flat = padded.reshape(-1)
        for lo in range(0, starts.numel(), _MAX_STARTS):
            hi = min(lo + _MAX_STARTS, starts.numel())

            def walk(ray: int, lo: int = lo, hi: int = hi) -> None:
                _walk_ray(flat, start_lin[lo:hi], start_lab[lo:hi], linear[ray], lengths_t[ray], dists[ray, lo:hi])

            if device.type == "cpu":  # rays spread over the threads (see map_on_threads)
                map_on_threads(walk, range(n_rays))
            else:
                for ray in range(n_rays):
                    walk(ray)
        out.reshape(-1, n_rays).index_copy_(0, starts, dists.T.contiguous())
    result = out
    return result if isinstance(labels, torch.Tensor) else result.numpy()


def _walk_ray(
    padded: torch.Tensor,
    start_lin: torch.Tensor,
    start_lab: torch.Tensor,
    linear: torch.Tensor,
    lengths: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Walk one ray (step offsets ``linear``, step lengths ``lengths``) from every start; write
    the exit distances to ``out[start]``.

    Steps are taken in chunks: one gather fetches the labels of the next ``chunk`` steps of all
    active starts, the first step outside gives the distance, and only the starts still inside
    after the chunk go on. Chunks trade a few wasted look-ups (past a start's exit) for far fewer
    passes over the active lists.
    """
    steps = linear.shape[0]
    index = torch.arange(start_lin.numel(), device=start_lin.device)
    lin, lab = start_lin, start_lab
    step, chunk = 1, _FIRST_CHUNK
    while index.numel() and step < steps:
        stop = min(step + chunk, steps)
        inside = padded.take(lin[:, None] + linear[step:stop]) == lab[:, None]
        # Position of the first step outside (``stop - step`` where all are inside).
        leaves = inside.logical_not_().cumsum(dim=1, dtype=torch.int16) == 0
        first = leaves.sum(dim=1)
        done = first < stop - step
        out.index_put_((index[done],), lengths[step:stop].take(first[done]))
        going = ~done
        index, lin, lab = index[going], lin[going], lab[going]
        step, chunk = stop, min(2 * chunk, _MAX_CHUNK)


def star_distances_3d_batch(
    labels: torch.Tensor, rays: Rays3D, grid: Sequence[int] = (1, 1, 1)
) -> torch.Tensor:
    """:func:`star_distances_3d` of a batch ``(N, Z, Y, X)`` of label volumes, in one pass.

    The volumes are stacked along z with background slices between them (as many as keep the
    sampling lattice aligned) and their labels made distinct: a step moves the rounded position by
    at most one voxel per axis, so a ray that leaves a volume stops on the separating background
    exactly where it would stop at the border. Returns ``(N, Z', Y', X', R)`` on the labels'
    device.
    """
    volumes = _as_label_volume(labels, ndim=4)
    gz, _, _ = normalize_grid_3d(grid)
    n, depth, height, width = volumes.shape
    if n == 1:
        return star_distances_3d(volumes[0], rays, grid)[None]
    gap = gz - depth % gz if depth % gz else gz
    stride = depth + gap
    maxima = volumes.reshape(n, -1).amax(dim=1)
    shift = torch.cumsum(maxima, 0) - maxima
    mosaic = torch.zeros((n * stride - gap, height, width), dtype=torch.int64, device=volumes.device)
    for i in range(n):
        volume = volumes[i]
        mosaic[i * stride:i * stride + depth] = torch.where(volume > 0, volume + shift[i], volume)
    dists = star_distances_3d(mosaic, rays, grid)
    out_d = -(-depth // gz)
    return torch.stack([dists[i * stride // gz:i * stride // gz + out_d] for i in range(n)])


def object_probabilities_3d(
    labels: ArrayOrTensor,
    grid: Sequence[int] = (1, 1, 1),
    anisotropy: Sequence[float] | None = None,
) -> ArrayOrTensor:
    """Normalised, anisotropy-aware Euclidean distance transform of every object.

    Each voxel of an object gets its Euclidean distance (in units of the smallest voxel side,
    with voxel sides ``anisotropy``) to the nearest voxel that does not belong to the object,
    divided by the maximum of that distance over the object; background is 0. As in the reference
    (and the 2D targets), the volume border does not count as background, except for a volume
    that is a single object without background, which is treated as surrounded by background.

    Parameters
    ----------
    labels : np.ndarray or torch.Tensor
        (Z, Y, X) integer label volume, 0 = background.
    grid : tuple of int
        Subsampling ``(gz, gy, gx)`` of the result (the full-resolution map sampled on the lattice).
    anisotropy : sequence of float, optional
        Voxel size ratios ``(a_z, a_y, a_x)`` (default isotropic), as for the rays.

    Returns
    -------
    np.ndarray or torch.Tensor
        float32 ``(ceil(Z / gz), ceil(Y / gy), ceil(X / gx))`` of the same kind as ``labels``
        (computed on the CPU with SciPy; a tensor is returned on its device).
    """
    gz, gy, gx = normalize_grid_3d(grid)
    sampling = normalize_anisotropy(anisotropy)
    tensor = _as_label_volume(labels)
    compact, n_objects = _compact_labels(tensor.cpu())
    volume = compact.numpy()
    prob = np.zeros(volume.shape, np.float32)
    if n_objects == 1 and bool((volume > 0).all()):
        prob = _normalised_edt(np.pad(volume > 0, 1), sampling)[1:-1, 1:-1, 1:-1]
    elif n_objects:
        for index, box in enumerate(ndimage.find_objects(volume), start=1):
            if box is None:
                continue
            # One voxel of context where the box does not touch the border, so that the
            # neighbouring background or labels are seen; beyond the border there is nothing.
            window = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, volume.shape))
            mask = volume[window] == index
            prob[window][mask] = _normalised_edt(mask, sampling)[mask]
    result = np.ascontiguousarray(prob[::gz, ::gy, ::gx])
    if isinstance(labels, torch.Tensor):
        return torch.from_numpy(result).to(labels.device)
    return result


def _normalised_edt(mask: np.ndarray, sampling: Sequence[float]) -> np.ndarray:
    edt = ndimage.distance_transform_edt(mask, sampling=sampling).astype(np.float32)
    peak = edt.max()
    return edt / peak if peak > 0 else edt
