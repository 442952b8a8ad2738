"""Noise2Void masking against its definition: stratified selection, uniform and median
replacement, structN2V lines, the blind-spot property, seeding, and the masked loss.

Statistical tests use fixed seeds and a p-value threshold of 1e-3, so they are deterministic; the
expected distributions come from the definitions, never from the code under test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from bioflow.losses.restoration import masked_mse
from bioflow.transforms.n2v import N2VMasking

P_MIN = 1e-3


def permutation_image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """float64 image holding a random permutation of 0..numel-1: every value names its position."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(math.prod(shape), generator=generator).to(torch.float64).reshape(shape)


def blind_spots_and_donors(
    image: torch.Tensor, output: torch.Tensor, mask: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """For a permutation image: full coordinates of every blind spot and of the pixel whose value it got."""
    centres = mask.nonzero().numpy()
    position_of_value = np.argsort(image.reshape(-1).numpy())
    donors = np.stack(np.unravel_index(position_of_value[output[mask].long().numpy()], image.shape), axis=1)
    return centres, donors


def line_pixels(mask: torch.Tensor, struct_mask: list[int], axis: int) -> torch.Tensor:
    """Bool tensor of the structN2V line pixels (centre excluded, inside the image) of every blind spot."""
    lines = torch.zeros_like(mask)
    half = len(struct_mask) // 2
    steps = [i - half for i, v in enumerate(struct_mask) if v == 1 and i != half]
    for centre in mask.nonzero().tolist():
        for step in steps:
            pixel = list(centre)
            pixel[axis] += step
            if 0 <= pixel[axis] < mask.shape[axis]:
                lines[tuple(pixel)] = True
    return lines


def chi_square_uniform(*groups: np.ndarray) -> float:
    """p-value of the hypothesis that the counts within each group are equally likely.

    Several groups (independent samples, each from its own uniform distribution) are combined into
    one chi-square test by summing their statistics and degrees of freedom, so that one call is one
    test whatever the number of groups.
    """
    statistic, dof = 0.0, 0
    for counts in groups:
        counts = np.asarray(counts, dtype=np.float64).ravel()
        assert counts.min() >= 5, "too few samples for the chi-square approximation"
        expected = counts.mean()
        statistic += float(((counts - expected) ** 2 / expected).sum())
        dof += counts.size - 1
    return float(stats.chi2.sf(statistic, dof))


# --- stratified selection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "fraction", "side", "per_plane"),
    [
        # 0.002 ** -0.5 = 22.36 -> side 22; ceil(64 / 22) = 3 boxes per axis
        ((2, 2, 64, 64), 0.002, 22, 3 * 3),
        # ceil(50 / 22) = 3, ceil(70 / 22) = 4; the last boxes are partial
        ((2, 1, 50, 70), 0.002, 22, 3 * 4),
        # 0.002 ** (-1/3) = 7.94 -> side 8; 32/8, 64/8, 64/8
        ((2, 1, 32, 64, 64), 0.002, 8, 4 * 8 * 8),
        # 0.01 ** -0.5 = 10; ceil(30 / 10) = 3, ceil(41 / 10) = 5
        ((1, 3, 30, 41), 0.01, 10, 3 * 5),
        # side 1: every pixel is a box
        ((1, 1, 10, 12), 1.0, 1, 120),
    ],
)
def test_one_blind_spot_per_box(shape, fraction, side, per_plane):
    image = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, mask = N2VMasking(mask_fraction=fraction, roi_size=3)(image)
    assert mask.shape == image.shape and mask.dtype == torch.bool
    spatial = shape[2:]
    assert (mask.flatten(2).sum(2) == per_plane).all()
    for starts in itertools.product(*(range(0, n, side) for n in spatial)):
        box = (slice(None), slice(None)) + tuple(slice(s, s + side) for s in starts)
        assert (mask[box].flatten(2).sum(2) == 1).all(), starts


def test_masked_fraction_is_close_to_the_requested_one():
    # 220 = 10 boxes of 22: 100 blind spots in 48,400 pixels = 0.2066 %
    _, mask = N2VMasking(mask_fraction=0.002)(torch.rand(4, 1, 220, 220))
    assert mask[0, 0].sum().item() == 100
    assert mask.float().mean().item() == pytest.approx(0.002, rel=0.05)


def test_position_inside_a_box_is_uniform_also_for_partial_boxes():
    # side 10 on 25 x 25: boxes start at 0, 10, 20; the last row/column of boxes is 5 wide
    planes = 3000
    _, mask = N2VMasking(mask_fraction=0.01, roi_size=3, seed=3)(torch.rand(planes, 1, 25, 25))
    groups = []
    for y0, x0 in itertools.product((0, 10, 20), repeat=2):
        counts = mask[:, 0, y0 : y0 + 10, x0 : x0 + 10].sum(0).flatten().numpy()
        assert counts.sum() == planes
        assert counts.size == min(10, 25 - y0) * min(10, 25 - x0)
        groups.append(counts)
    assert chi_square_uniform(*groups) > P_MIN


# --- uniform replacement (N2V) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "fraction", "roi_size", "calls"),
    [((256, 1, 64, 64), 0.002, 11, 4), ((64, 1, 64, 64), 0.002, 5, 4), ((16, 1, 16, 16, 16), 1 / 64, 3, 4)],
)
def test_uniform_offsets_are_uniform_over_the_roi_without_its_centre(shape, fraction, roi_size, calls):
    image = permutation_image(shape)
    masking = N2VMasking(mask_fraction=fraction, roi_size=roi_size, seed=11)
    half = roi_size // 2
    ndim = len(shape) - 2
    counts = np.zeros((roi_size,) * ndim, dtype=np.int64)
    for _ in range(calls):
        output, mask = masking(image)
        centres, donors = blind_spots_and_donors(image, output, mask)
        assert (donors[:, :2] == centres[:, :2]).all()  # same sample and channel
        spatial = centres[:, 2:]
        away = ((spatial >= half) & (spatial < np.array(shape[2:]) - half)).all(1)
        offsets = donors[away, 2:] - spatial[away]
        assert np.abs(offsets).max() <= half
        np.add.at(counts, tuple((offsets + half).T), 1)
    centre = (half,) * ndim
    assert counts[centre] == 0
    others = np.delete(counts.ravel(), np.ravel_multi_index(centre, counts.shape))
    assert others.size == roi_size**ndim - 1
    assert chi_square_uniform(others) > P_MIN


@pytest.mark.parametrize(
    ("roi_size", "struct_mask"), [(5, None), (3, None), (3, [1, 1, 1]), (5, [1, 0, 1, 1, 1])]
)
def test_uniform_donors_at_the_border_are_uniform_over_in_image_candidates(roi_size, struct_mask):
    # Tiny 3 x 4 planes put every blind spot near the border; each plane holds 0..11, so a value
    # names its donor pixel.
    planes, height, width = 6000, 3, 4
    plane = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width)
    image = plane.repeat(planes, 1, 1, 1)
    masking = N2VMasking(mask_fraction=1 / 12, roi_size=roi_size, struct_mask=struct_mask, seed=5)
    # side round(sqrt(12)) = 3 gives boxes of 3x3 and 3x1: two blind spots per plane
    output, mask = masking(image)
    half = roi_size // 2
    line = set()
    if struct_mask is not None:
        line = {i - len(struct_mask) // 2 for i, v in enumerate(struct_mask) if v == 1}
    groups = []
    for y, x in itertools.product(range(height), range(width)):
        donors = output[mask[:, 0, y, x], 0, y, x].long().numpy()
        counts = np.bincount(donors, minlength=height * width).reshape(height, width)
        candidates = np.zeros((height, width), dtype=bool)
        for v, u in itertools.product(range(height), range(width)):
            dy, dx = v - y, u - x
            on_line = dy == 0 and dx in line  # struct along x; includes the centre when struct is set
            candidates[v, u] = max(abs(dy), abs(dx)) <= half and (dy, dx) != (0, 0) and not on_line
        assert counts[~candidates].sum() == 0, (y, x)
        groups.append(counts[candidates])
    # every position, corners included, takes part in one combined test
    assert chi_square_uniform(*groups) > P_MIN


# --- median replacement (N2V2) ----------------------------------------------------------------


def reference_median(
    image: np.ndarray, centre: tuple[int, ...], roi_size: int, line: set[int], axis: int
) -> float:
    """np.median of the roi around ``centre`` (in one plane), centre and line offsets left out."""
    half = roi_size // 2
    values = []
    for offset in itertools.product(range(-half, half + 1), repeat=image.ndim):
        pixel = tuple(c + o for c, o in zip(centre, offset))
        if not all(0 <= p < n for p, n in zip(pixel, image.shape)):
            continue
        if all(o == 0 for i, o in enumerate(offset) if i != axis) and offset[axis] in line:
            continue
        values.append(image[pixel])
    return float(np.median(values))


@pytest.mark.parametrize(
    ("shape", "fraction", "roi_size", "struct_mask", "struct_axis", "ties"),
    [
        ((2, 2, 13, 17), 1 / 16, 5, None, "x", False),
        ((2, 1, 13, 17), 1 / 16, 5, None, "x", True),
        ((1, 2, 12, 11), 1 / 9, 7, [1, 0, 1, 1, 1], "y", False),
        ((1, 1, 12, 11), 1 / 9, 3, [1, 1, 1, 1, 1, 1, 1], "x", True),
        ((1, 2, 7, 9, 8), 1 / 27, 3, None, "x", False),
        ((1, 1, 7, 9, 8), 1 / 27, 5, [1, 1, 1], "y", True),
    ],
)
def test_median_matches_a_loop_implementation(shape, fraction, roi_size, struct_mask, struct_axis, ties):
    generator = torch.Generator().manual_seed(2)
    if ties:  # few distinct values exercise equal middle values
        image = torch.randint(0, 4, shape, generator=generator).to(torch.float64)
    else:
        image = torch.randn(shape, generator=generator, dtype=torch.float64)
    masking = N2VMasking(fraction, roi_size, "median", struct_mask, struct_axis, seed=4)
    output, mask = masking(image)
    ndim = len(shape) - 2
    axis = ndim - 1 if struct_axis == "x" else ndim - 2
    line = {0}
    if struct_mask is not None:
        line = {i - len(struct_mask) // 2 for i, v in enumerate(struct_mask) if v == 1}
    centres = mask.nonzero().tolist()
    assert centres
    for n, c, *centre in centres:
        expected = reference_median(image[n, c].numpy(), tuple(centre), roi_size, line, axis)
        assert output[(n, c, *centre)].item() == pytest.approx(expected, abs=1e-12)
    if struct_mask is None:
        assert torch.equal(output[~mask], image[~mask])


# --- structN2V ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "struct_mask", "struct_axis", "replacement", "boxes"),
    [
        # 0.01 ** -0.5 = 10: 4 x 4 boxes; 0.01 ** (-1/3) = 4.64 -> side 5: 3 x 5 x 5 boxes
        ((3, 2, 40, 40), [1, 1, 1, 1, 1], "x", "uniform", 16),
        ((3, 2, 40, 40), [1, 0, 1, 1, 1, 1, 1], "y", "median", 16),
        ((2, 1, 12, 24, 24), [1, 1, 1, 1, 1, 1, 1, 1, 1], "x", "uniform", 75),
    ],
)
def test_struct_lines_get_random_values_and_nothing_else_changes(
    shape, struct_mask, struct_axis, replacement, boxes
):
    image = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    masking = N2VMasking(0.01, 5, replacement, struct_mask, struct_axis, seed=8)
    output, mask = masking(image)
    ndim = len(shape) - 2
    axis = 2 + (ndim - 1 if struct_axis == "x" else ndim - 2)
    lines = line_pixels(mask, struct_mask, axis) & ~mask

    changed = output != image
    assert lines.any()
    # with continuous values, a replacement equal to the original value has probability 0
    assert torch.equal(changed, mask | lines)
    # the loss mask holds the blind spots only: one per box
    assert (mask.flatten(2).sum(2) == boxes).all()

    # line values are uniform over [min, max] of their plane's original values
    per_plane = (*shape[:2], *([1] * ndim))
    low = image.flatten(2).min(2).values.view(per_plane)
    high = image.flatten(2).max(2).values.view(per_plane)
    scaled = ((output - low) / (high - low))[lines].numpy()
    assert scaled.min() >= 0.0 and scaled.max() <= 1.0
    assert stats.kstest(scaled, "uniform").pvalue > P_MIN


def test_struct_donors_never_come_from_the_line():
    shape = (128, 1, 48, 48)
    image = permutation_image(shape, seed=9)
    struct_mask = [1, 1, 1, 1, 1]
    output, mask = N2VMasking(0.004, 5, "uniform", struct_mask, "x", seed=10)(image)
    centres, donors = blind_spots_and_donors(image, output, mask)
    offsets = donors[:, 2:] - centres[:, 2:]
    assert (np.abs(offsets).max(1) >= 1).all() and np.abs(offsets).max() <= 2
    on_line = offsets[:, 0] == 0  # any offset along x within +-2 is on this line
    assert not on_line.any()
    # the remaining 20 offsets stay equally likely away from the border
    half = 2
    away = ((centres[:, 2:] >= half) & (centres[:, 2:] < 48 - half)).all(1)
    codes = (offsets[away, 0] + half) * 5 + offsets[away, 1] + half
    counts = np.bincount(codes, minlength=25).reshape(5, 5)
    assert counts[2].sum() == 0
    assert chi_square_uniform(np.delete(counts, 2, axis=0).ravel()) > P_MIN


# --- the blind-spot property ---------------------------------------------------------------------


@pytest.mark.parametrize("struct_mask", [None, [1, 1, 1]])
@pytest.mark.parametrize("shape", [(4, 3, 40, 50), (2, 2, 10, 20, 20)])
def test_blind_spots_hold_a_neighbours_value_never_their_own(shape, struct_mask):
    image = permutation_image(shape, seed=12)
    roi_size = 7
    output, mask = N2VMasking(0.01, roi_size, "uniform", struct_mask, "x", seed=13)(image)
    assert (output[mask] != image[mask]).all()
    centres, donors = blind_spots_and_donors(image, output, mask)
    offsets = donors - centres
    assert (offsets[:, :2] == 0).all()
    assert (np.abs(offsets[:, 2:]).max(1) >= 1).all()
    assert np.abs(offsets[:, 2:]).max() <= roi_size // 2
    untouched = ~mask
    if struct_mask is not None:
        untouched &= ~line_pixels(mask, struct_mask, len(shape) - 1)
    assert torch.equal(output[untouched], image[untouched])


@pytest.mark.parametrize(
    ("replacement", "struct_mask"),
    [("uniform", None), ("median", None), ("uniform", [1, 1, 1]), ("median", [1, 1, 1])],
)
def test_blind_spot_value_does_not_depend_on_the_original_pixel(replacement, struct_mask):
    image = torch.rand(2, 2, 30, 30, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    masking = N2VMasking(0.01, 5, replacement, struct_mask)
    output, mask = masking(image, torch.Generator().manual_seed(15))
    for position in mask.nonzero()[::4].tolist():
        position = tuple(position)
        changed = image.clone()
        # only the blind spot's own output is compared: line values may follow a changed range
        changed[position] = 1.0 - image[position]
        assert changed[position] != image[position]
        output2, mask2 = masking(changed, torch.Generator().manual_seed(15))
        assert torch.equal(mask2, mask)
        assert output2[position] == output[position]


# --- randomness ----------------------------------------------------------------------------------


def test_same_seed_same_masks_and_different_seed_different_masks():
    image = torch.rand(4, 2, 64, 64)
    first, second = N2VMasking(seed=3), N2VMasking(seed=3)
    results = [(first(image), second(image)) for _ in range(2)]
    for (out_a, mask_a), (out_b, mask_b) in results:
        assert torch.equal(out_a, out_b) and torch.equal(mask_a, mask_b)
    # the stream advances: a second call masks other pixels
    assert not torch.equal(results[0][0][1], results[1][0][1])
    _, other = N2VMasking(seed=4)(image)
    assert not torch.equal(other, results[0][0][1])


def test_explicit_generator_is_used_and_leaves_the_own_stream_alone():
    image = torch.rand(4, 1, 64, 64)
    with_a = N2VMasking(seed=1)(image, torch.Generator().manual_seed(99))
    with_b = N2VMasking(seed=2)(image, torch.Generator().manual_seed(99))
    assert torch.equal(with_a[0], with_b[0]) and torch.equal(with_a[1], with_b[1])

    masking = N2VMasking(seed=1)
    masking(image, torch.Generator().manual_seed(99))
    _, after_explicit = masking(image)
    _, fresh = N2VMasking(seed=1)(image)
    assert torch.equal(after_explicit, fresh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("replacement", ["uniform", "median"])
def test_cuda_has_its_own_seeded_generator_and_does_not_synchronise(replacement):
    image = torch.rand(8, 1, 64, 64, device="cuda")
    masking = N2VMasking(replacement=replacement, struct_mask=[1, 1, 1], seed=5)
    masking(image.cpu())  # a CPU call first must not disturb the CUDA stream
    output, mask = masking(image)
    assert output.device == image.device and mask.device == image.device
    assert (mask.flatten(2).sum(2) == 9).all()
    again = N2VMasking(replacement=replacement, struct_mask=[1, 1, 1], seed=5)(image)
    assert torch.equal(again[0], output) and torch.equal(again[1], mask)
    # masking runs before the forward pass; a host-device sync here would stall the training loop
    torch.cuda.set_sync_debug_mode("error")
    try:
        masking(image)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- shapes, dtypes, inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("replacement", ["uniform", "median"])
def test_dtype_shape_and_input_untouched(dtype, replacement):
    image = torch.rand(3, 2, 33, 45).to(dtype)
    original = image.clone()
    output, mask = N2VMasking(0.01, 5, replacement, [1, 1, 1])(image)
    assert output.shape == image.shape and output.dtype == dtype and mask.dtype == torch.bool
    assert torch.equal(image, original)
    assert (output[mask] != image[mask]).float().mean() > 0.5


@pytest.mark.parametrize("replacement", ["uniform", "median"])
@pytest.mark.parametrize("shape", [(0, 1, 16, 16), (0, 2, 8, 16, 16)])
def test_empty_batch(shape, replacement):
    output, mask = N2VMasking(0.01, 5, replacement, [1, 1, 1])(torch.rand(shape))
    assert output.shape == mask.shape == shape and not mask.any()


def test_non_contiguous_input_is_masked_like_its_contiguous_copy():
    base = torch.rand(2, 1, 40, 30)
    image = base.transpose(2, 3)  # (2, 1, 30, 40), not contiguous
    masking = N2VMasking(0.01, 5, "median")
    out_view, mask_view = masking(image, torch.Generator().manual_seed(1))
    out_copy, mask_copy = masking(image.contiguous(), torch.Generator().manual_seed(1))
    assert torch.equal(out_view, out_copy) and torch.equal(mask_view, mask_copy)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask_fraction": 0.0},
        {"mask_fraction": 1.5},
        {"roi_size": 4},
        {"roi_size": 1},
        {"replacement": "mean"},
        {"struct_mask": [1, 1]},
        {"struct_mask": [1, 0, 1]},
        {"struct_mask": [1, 2, 1]},
        {"struct_axis": "z"},
    ],
)
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        N2VMasking(**kwargs)


def test_invalid_inputs_are_rejected():
    masking = N2VMasking()
    with pytest.raises(ValueError):
        masking(torch.rand(2, 1, 64))
    with pytest.raises(ValueError):
        masking(torch.rand(2, 1, 1, 64))
    with pytest.raises(TypeError):
        masking(torch.ones(2, 1, 64, 64, dtype=torch.int64))


# --- loss ---------------------------------------------------------------------------------------


def test_masked_mse_by_hand():
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    target = torch.tensor([[[[0.0, 0.0], [0.0, 10.0]]]])
    mask = torch.tensor([[[[True, False], [False, True]]]])
    loss = masked_mse(prediction, target, mask)
    assert loss.item() == pytest.approx((1.0**2 + 6.0**2) / 2)
    loss.backward()
    # d/dp of sum((p - t)^2) / 2 is (p - t) at masked pixels, 0 elsewhere
    assert torch.equal(prediction.grad, torch.tensor([[[[1.0, 0.0], [0.0, -6.0]]]]))


def test_masked_mse_with_an_empty_mask_is_zero_and_differentiable():
    prediction = torch.rand(2, 1, 4, 4, requires_grad=True)
    loss = masked_mse(prediction, torch.rand(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(prediction.grad, torch.zeros_like(prediction))


def test_masked_mse_ignores_unmasked_pixels_of_a_masked_batch():
    image = torch.rand(2, 1, 32, 32)
    masked, mask = N2VMasking(0.01)(image)
    prediction = image.clone()
    prediction[~mask] += 100.0  # errors outside the blind spots must not count
    prediction[mask] += 0.5
    assert masked_mse(prediction, image, mask).item() == pytest.approx(0.25)
