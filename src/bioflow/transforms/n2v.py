"""Noise2Void blind-spot masking (N2V, N2V2, structN2V) as a batch transform, and its loss.

Noise2Void trains a denoiser on noisy images alone. A few pixels of every training patch, the
*blind spots*, are given other values before the patch enters the network, and the loss compares
the prediction at those pixels with their original noisy values (:func:`masked_mse`). Because the
network never sees a blind spot's own value, it cannot learn the identity and instead predicts the
pixel from its surroundings, which removes noise that is independent from pixel to pixel.

:class:`N2VMasking` works on a whole collated batch, on whatever device the batch lives on, with a
number of vectorised tensor operations that does not depend on the batch (no Python loop over
pixels, boxes or patches).

References: Krull et al., "Noise2Void - Learning Denoising from Single Noisy Images" (CVPR 2019);
Höck et al., "N2V2 - Fixing Noise2Void Checkerboard Artifacts with Modified Sampling Strategies
and a Tweaked Network Architecture" (ECCV workshops 2022); Broaddus et al., "Removing Structured
Noise with Self-Supervised Blind-Spot Networks" (ISBI 2020, structN2V).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
from torch import nn

# Random indices are drawn as integers below this bound and reduced modulo the number of choices;
# with at most a few thousand choices the modulo bias is below 2**-50, far below anything a test
# or a training run could notice.
_RANDOM_RANGE = 2**62


def _random_below(bound: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Independent uniform integers in ``[0, bound)``, one per element of ``bound`` (int64, > 0)."""
    raw = torch.randint(0, _RANDOM_RANGE, bound.shape, generator=generator, device=bound.device)
    return raw % bound


def _strides(spatial: Sequence[int]) -> list[int]:
    """Element strides of a C-contiguous array of shape ``spatial``."""
    strides = [1] * len(spatial)
    for axis in range(len(spatial) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * spatial[axis + 1]
    return strides


def _flat(coordinates: torch.Tensor, strides: Sequence[int]) -> torch.Tensor:
    """Flat offsets of coordinates ``(..., d)`` for the given strides."""
    # Python-int strides avoid building small device tensors from host data: on CUDA each such
    # copy would wait for all queued work.
    flat = coordinates[..., 0] * strides[0]
    for axis in range(1, len(strides)):
        flat = flat + coordinates[..., axis] * strides[axis]
    return flat


class N2VMasking(nn.Module):
    """Replace a stratified random subset of pixels by blind-spot values (Noise2Void).

    Every channel of every patch is masked independently: each ``(sample, channel)`` plane gets
    its own blind-spot positions and replacement values. This follows the reference N2V, which
    masks channels one at a time; it relies on the N2V assumption that noise is independent
    between channels, since a blind spot of one channel stays visible in the other channels.

    **Selection.** The spatial grid of a plane is divided into cubic boxes of side
    ``round(mask_fraction ** (-1 / d))`` (``d`` = number of spatial axes), starting at the origin;
    one pixel is drawn uniformly inside each box. Boxes cut by the far border are partial and their
    pixel is drawn uniformly inside the part within the image, so every box yields exactly one
    blind spot and the masked fraction is ``boxes / pixels`` (about ``mask_fraction``).

    **Replacement.**

    - ``"uniform"`` (N2V): the value of a *donor* pixel drawn uniformly from the ``roi_size**d``
      region centred on the blind spot, the centre excluded. Donors outside the image are not
      candidates: the donor is uniform over the in-image candidates, which is exactly the
      distribution of redrawing an offset until it lands inside the image. Unlike reflecting or
      clamping coordinates, this favours no pixel and can never return the centre; away from the
      border all ``roi_size**d - 1`` offsets are equally likely.
    - ``"median"`` (N2V2): the median (mean of the two middle values for an even count) of the
      in-image pixels of that region, the centre excluded.

    **structN2V.** ``struct_mask`` is a line of odd length, centred on the blind spot, along
    ``struct_axis`` (``"x"`` is the last spatial axis, ``"y"`` the one before; in 3D the line lies
    within the blind spot's z-plane). Entry ``i`` covers the pixel at offset
    ``i - len(struct_mask) // 2``; the centre entry must be 1 and stands for the blind spot itself,
    which is replaced by the rule above. Every other pixel with entry 1 is set to an independent
    value drawn uniformly from ``[min, max]`` of its plane (the original values), as CAREamics
    does; the original structN2V code draws from ``[-2, 2]``, which presumes standardised data.
    Line pixels outside the image are skipped. Because structured noise is correlated along the
    line, the line's pixels are also excluded from the donors and from the median. The loss mask
    holds the blind spots only. Blind-spot values are written after all line values, so a blind
    spot crossed by another blind spot's line still gets its N2V value.

    As in the reference implementations, donors and medians are taken from the original values,
    which may include *another* blind spot within the roi: for ``"uniform"`` with probability of
    about ``mask_fraction`` per blind spot, that other blind spot's value then appears, displaced,
    in the network input. Such rare, weak leaks are tolerated rather than paid for with extra
    bookkeeping.

    **Randomness.** A ``generator`` passed to :meth:`forward` (on the image's device) is used as
    is. Otherwise the module keeps one :class:`torch.Generator` per device, created on first use
    and seeded with ``seed``; successive calls continue its stream, so two modules with the same
    seed produce the same sequence of masks for the same inputs. Under data-parallel training,
    give each rank its own seed (e.g. ``seed + rank``) so ranks do not mask identically. The
    generator state is not part of the module's ``state_dict``.

    Parameters
    ----------
    mask_fraction
        Target fraction of blind spots per plane, in ``(0, 1]``.
    roi_size
        Side of the neighbourhood the replacement comes from; odd, at least 3.
    replacement
        ``"uniform"`` (N2V) or ``"median"`` (N2V2).
    struct_mask
        structN2V line of 0/1 entries (odd length, centre entry 1), or ``None`` for plain N2V.
    struct_axis
        Axis of the structN2V line: ``"x"`` or ``"y"``.
    seed
        Seed of the per-device generators.
    """

    def __init__(
        self,
        mask_fraction: float = 0.002,
        roi_size: int = 11,
        replacement: Literal["uniform", "median"] = "uniform",
        struct_mask: Optional[list[int]] = None,
        struct_axis: Literal["x", "y"] = "x",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < mask_fraction <= 1.0:
            raise ValueError(f"mask_fraction must be in (0, 1], got {mask_fraction}")
        if roi_size < 3 or roi_size % 2 == 0:
            raise ValueError(f"roi_size must be an odd integer >= 3, got {roi_size}")
        if replacement not in ("uniform", "median"):
            raise ValueError(f"replacement must be 'uniform' or 'median', got {replacement!r}")
        if struct_axis not in ("x", "y"):
            raise ValueError(f"struct_axis must be 'x' or 'y', got {struct_axis!r}")
        if struct_mask is not None:
            struct_mask = [int(v) for v in struct_mask]
            if len(struct_mask) % 2 == 0 or any(v not in (0, 1) for v in struct_mask):
                raise ValueError(f"struct_mask must be an odd-length list of 0/1, got {struct_mask}")
            if struct_mask[len(struct_mask) // 2] != 1:
                raise ValueError(
                    f"the centre entry of struct_mask is the blind spot and must be 1, got {struct_mask}"
                )
        self.mask_fraction = float(mask_fraction)
        self.roi_size = int(roi_size)
        self.replacement = replacement
        self.struct_mask = struct_mask
        self.struct_axis = struct_axis
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def extra_repr(self) -> str:
        return (
            f"mask_fraction={self.mask_fraction}, roi_size={self.roi_size}, replacement={self.replacement!r}, "
            f"struct_mask={self.struct_mask}, struct_axis={self.struct_axis!r}, seed={self.seed}"
        )

    def box_side(self, spatial_dims: int) -> int:
        """Side of the selection boxes for images with ``spatial_dims`` spatial axes."""
        return max(1, round(self.mask_fraction ** (-1.0 / spatial_dims)))

    def forward(
        self, image: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a batch.

        Parameters
        ----------
        image
            Floating-point batch ``(N, C, *spatial)`` with 2 or 3 spatial axes, each at least 2
            long, on any device. It is not modified.
        generator
            Random generator on ``image.device``; ``None`` uses the module's own for that device.

        Returns
        -------
        masked_image
            Same shape, dtype and device as ``image``: blind spots (and structN2V lines) replaced.
        mask
            Boolean tensor of the same shape, True exactly at the blind spots.
        """
        spatial = tuple(image.shape[2:])
        if len(spatial) not in (2, 3):
            raise ValueError(
                f"expected an image (N, C, *spatial) with 2 or 3 spatial axes, got shape {tuple(image.shape)}"
            )
        if not image.is_floating_point():
            raise TypeError(f"N2VMasking needs a floating-point image, got {image.dtype}")
        if min(spatial) < 2:
            # With every axis at least 2 long, the pixel one step away along an axis other than
            # the structN2V axis is always a valid donor, so no blind spot is left without one.
            raise ValueError(f"every spatial axis must be at least 2 pixels long, got {spatial}")
        if generator is None:
            generator = self._generator_for(image.device)

        planes = image.shape[0] * image.shape[1]
        plane_size = math.prod(spatial)
        strides = _strides(spatial)
        # C-order flat view of the original values; a copy only if the input is not contiguous.
        source = image.reshape(-1)

        plane, centres = self._select(planes, spatial, generator, image.device)
        index = plane * plane_size + _flat(centres, strides)

        if self.replacement == "uniform":
            donor = self._uniform_donors(centres, spatial, generator)
            values = source[index + _flat(donor, strides)]
        else:
            values = self._median(source, centres, index, spatial, strides)

        output = image.clone(memory_format=torch.contiguous_format)
        flat_output = output.view(-1)
        if self._line_offsets():
            original = source.view(planes, plane_size)
            self._fill_lines(flat_output, original, plane, centres, index, spatial, generator)
        flat_output[index] = values
        mask = torch.zeros(image.shape, dtype=torch.bool, device=image.device)
        mask.view(-1).index_fill_(0, index, True)
        return output, mask

    def _generator_for(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[device] = generator
        return generator

    def _select(
        self, planes: int, spatial: tuple[int, ...], generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One uniform pixel per box of every plane: plane index (P,) and coordinates (P, d)."""
        side = self.box_side(len(spatial))
        boxes = [-(-size // side) for size in spatial]
        grid = torch.meshgrid(*(torch.arange(n, device=device) for n in (planes, *boxes)), indexing="ij")
        plane = grid[0].reshape(-1)
        starts = torch.stack([g.reshape(-1) * side for g in grid[1:]], dim=1)
        extents = torch.stack([(n - starts[:, axis]).clamp(max=side) for axis, n in enumerate(spatial)], dim=1)
        return plane, starts + _random_below(extents, generator)

    def _line_offsets(self) -> list[int]:
        """Offsets along the structN2V axis of the line pixels other than the blind spot."""
        if self.struct_mask is None:
            return []
        half = len(self.struct_mask) // 2
        return [i - half for i, v in enumerate(self.struct_mask) if v == 1 and i != half]

    def _line_axis(self, spatial_dims: int) -> int:
        return spatial_dims - 1 if self.struct_axis == "x" else spatial_dims - 2

    def _uniform_donors(
        self, centres: torch.Tensor, spatial: tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """Donor offsets (P, d), uniform over the allowed in-image offsets of each centre's roi.

        The in-image part of a roi is a box; the offsets it must skip (centre and line pixels) all
        lie on the centre's row along the line axis. Drawing an index among the allowed ones and
        stepping it over the skipped ones costs O(P * line length) instead of O(P * roi_size**d).
        """
        half = self.roi_size // 2
        low = (-centres).clamp(min=-half)
        high = torch.stack([(n - 1 - centres[:, axis]).clamp(max=half) for axis, n in enumerate(spatial)], dim=1)
        extent = high - low + 1
        # raster-order weights of the box: weight[:, i] = prod(extent[:, i + 1:])
        weight = torch.ones_like(extent)
        for axis in range(len(spatial) - 2, -1, -1):
            weight[:, axis] = weight[:, axis + 1] * extent[:, axis + 1]
        axis = self._line_axis(len(spatial))
        centre = (-low * weight).sum(1)
        steps = sorted({0, *(t for t in self._line_offsets() if abs(t) <= half)})
        # ascending steps along one axis give ascending box indices, as the stepping-over requires
        first, last = low[:, axis], low[:, axis] + extent[:, axis] - 1
        skipped = [((first <= t) & (t <= last), centre + t * weight[:, axis]) for t in steps]
        count = weight[:, 0] * extent[:, 0] - torch.stack([inside for inside, _ in skipped]).sum(0)
        pick = _random_below(count, generator)
        for inside, position in skipped:
            pick = pick + (inside & (pick >= position))
        return low + (pick.unsqueeze(1) // weight) % extent

    def _median(
        self,
        source: torch.Tensor,
        centres: torch.Tensor,
        index: torch.Tensor,
        spatial: tuple[int, ...],
        strides: list[int],
    ) -> torch.Tensor:
        """Median of the allowed in-image roi pixels of each centre (mean of the middle two if even)."""
        half = self.roi_size // 2
        steps = torch.arange(-half, half + 1, device=centres.device)
        grid = torch.meshgrid(*([steps] * len(spatial)), indexing="ij")
        offsets = torch.stack([g.reshape(-1) for g in grid], dim=1)
        allowed = offsets.abs().sum(1) != 0
        line = self._line_offsets()
        if line:
            axis = self._line_axis(len(spatial))
            across = torch.cat([offsets[:, :axis], offsets[:, axis + 1 :]], dim=1)
            along = torch.zeros_like(allowed)
            for step in line:
                along |= offsets[:, axis] == step
            allowed &= ~((across == 0).all(1) & along)
        positions = [centres[:, [axis]] + steps for axis in range(len(spatial))]
        per_axis = [(position >= 0) & (position < size) for position, size in zip(positions, spatial)]
        valid = per_axis[0]
        for axis in range(1, len(spatial)):
            # outer product over the axes, the last one varying fastest like the raster-order offsets
            valid = valid.unsqueeze(-1) & per_axis[axis].view(len(centres), *([1] * axis), self.roi_size)
        valid = valid.reshape(len(centres), len(offsets)) & allowed
        count = valid.sum(1)

        # Invalid neighbours read the centre (always in bounds), then rank after every valid value.
        # Of the K = roi_size**d roi pixels at most K - 1 are valid, so the middle ones sit among the
        # (K + 1) // 2 smallest: a partial sort (topk) suffices, about twice as fast as a full sort.
        neighbour = torch.where(valid, index.unsqueeze(1) + _flat(offsets, strides), index.unsqueeze(1))
        values = source[neighbour].masked_fill(~valid, float("inf"))
        ordered = values.topk((len(offsets) + 1) // 2, dim=1, largest=False).values
        low = ordered.gather(1, ((count - 1) // 2).unsqueeze(1)).squeeze(1)
        high = ordered.gather(1, (count // 2).unsqueeze(1)).squeeze(1)
        # average in at least float32 so that half-precision middles cannot overflow
        wide = torch.promote_types(source.dtype, torch.float32)
        return ((low.to(wide) + high.to(wide)) / 2).to(source.dtype)

    def _fill_lines(
        self,
        flat_output: torch.Tensor,
        planes: torch.Tensor,
        plane: torch.Tensor,
        centres: torch.Tensor,
        index: torch.Tensor,
        spatial: tuple[int, ...],
        generator: torch.Generator,
    ) -> None:
        """Write uniform random values in the plane's value range on the structN2V line pixels."""
        axis = self._line_axis(len(spatial))
        stride = _strides(spatial)[axis]
        targets = []
        for step in self._line_offsets():
            position = centres[:, axis] + step
            inside = (position >= 0) & (position < spatial[axis])
            # Line pixels outside the image are sent to their own blind spot, which is overwritten
            # afterwards; boolean indexing instead would synchronise with the device.
            targets.append(torch.where(inside, index + step * stride, index))
        target = torch.stack(targets, dim=1)
        low, high = torch.aminmax(planes, dim=1)
        wide = torch.promote_types(planes.dtype, torch.float32)
        low, high = low[plane].to(wide).unsqueeze(1), high[plane].to(wide).unsqueeze(1)
        fraction = torch.rand(target.shape, generator=generator, device=target.device, dtype=wide)
        flat_output[target.reshape(-1)] = (low + (high - low) * fraction).to(planes.dtype).reshape(-1)
