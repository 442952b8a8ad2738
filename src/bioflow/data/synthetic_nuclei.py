"""Deterministic synthetic fluorescence images of nuclei, with instance labels (2D and 3D).

Each nucleus is a star-convex blob: an ellipse (ellipsoid) of random size and orientation whose
radius is modulated by a few low-frequency harmonics. Neighbours may touch and overlap; a pixel
covered by several nuclei belongs to the one whose (scaled) centre is nearest, so every instance
stays one connected, star-convex region. The image adds per-nucleus brightness, internal texture,
uneven illumination, optical blur, Poisson (shot) noise and Gaussian (read) noise, and is returned
as uint16 like a camera image.

The same ``seed`` and ``index`` always give the same image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    if ndim == 2:
        a = rng.uniform(0, np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _scaled_distance(
    coords: np.ndarray, radii: np.ndarray, rotation: np.ndarray, harmonics: list[tuple[np.ndarray, float, float]]
) -> np.ndarray:
    """Distance to the centre in units of the blob's radius along that direction (<1 inside)."""
    local = coords @ rotation  # coordinates in the blob's own axes
    norm = np.sqrt(((local / radii) ** 2).sum(-1))
    length = np.linalg.norm(local, axis=-1) + 1e-9
    unit = local / length[..., None]
    modulation = np.ones_like(norm)
    for axis, amplitude, frequency in harmonics:
        cos_angle = np.clip(unit @ axis, -1.0, 1.0)
        modulation += amplitude * np.cos(frequency * np.arccos(cos_angle))
    return norm / modulation


def synthetic_nuclei_image(
    shape: tuple[int, ...],
    seed: int = 0,
    index: int = 0,
    n_nuclei: int | None = None,
    radius: tuple[float, float] = (6.0, 12.0),
    overlap: float = 0.25,
    clustering: float = 0.5,
    anisotropy: float = 1.0,
    rare_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic image and its instance labels.

    Parameters
    ----------
    shape
        (Y, X) or (Z, Y, X).
    seed, index
        Together they fix the random state: image ``index`` of data set ``seed``.
    n_nuclei
        Number of nuclei to try to place; the default aims at about a third of the area.
    radius
        Range of the nuclei's mean radius in pixels.
    overlap
        How far neighbours may overlap, as a fraction of the smaller radius (0: at most touching).
    clustering
        Probability that a nucleus is placed right next to an earlier one (touching or overlapping)
        instead of uniformly at random.
    anisotropy
        For 3D: ratio of the z step to the xy pixel size (>1 flattens nuclei along z).
    rare_fraction
        Probability that a nucleus is of a rare, distinct kind: half the radius, bright and without
        texture (like condensed, mitotic nuclei). With a non-zero value a third array is returned:
        the labels of the rare nuclei. Rare kinds are drawn from a separate random stream, so the
        other nuclei stay as they are for the same ``seed`` and ``index``.

    Returns
    -------
    image : uint16 array of ``shape``
    labels : int32 array of ``shape``; 0 is background, nuclei are 1..n
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 axes, got {shape}")
    rng = np.random.default_rng([seed, index])
    rare_rng = np.random.default_rng([seed, index, 99])
    scale = np.array([anisotropy] + [1.0] * (ndim - 1)) if ndim == 3 else np.ones(2)
    mean_r = float(np.mean(radius))
    unit_volume = np.pi * mean_r**2 if ndim == 2 else 4 / 3 * np.pi * mean_r**3 / anisotropy
    if n_nuclei is None:
        n_nuclei = max(1, int(0.35 * np.prod(shape) / unit_volume))

    centres: list[np.ndarray] = []
    sizes: list[float] = []
    rare: list[bool] = []
    attempts = 0
    while len(centres) < n_nuclei and attempts < 50 * n_nuclei:
        attempts += 1
        r = rng.uniform(*radius)
        is_rare = rare_fraction > 0 and rare_rng.uniform() < rare_fraction
        r = 0.5 * r if is_rare else r
        if centres and rng.uniform() < clustering:
            j = rng.integers(len(centres))
            direction = rng.normal(size=ndim)
            direction /= np.linalg.norm(direction)
            gap = (r + sizes[j]) * (1.0 - overlap * rng.uniform())
            c = centres[j] + direction * gap / scale
        else:
            c = rng.uniform(0, shape)
        ok = True
        for c2, r2 in zip(centres, sizes):
            d = np.linalg.norm((c - c2) * scale)
            if d < (r + r2) - 2 * overlap * min(r, r2) or d < 0.8 * max(r, r2):
                ok = False
                break
        if ok:
            centres.append(c)
            sizes.append(r)
            rare.append(is_rare)

    best = np.full(shape, np.inf, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int32)
    brightness = np.zeros(shape, dtype=np.float32)
    smooth = np.zeros(shape, dtype=bool)  # rare nuclei carry no texture
    for i, (c, r) in enumerate(zip(centres, sizes), start=1):
        elong = rng.uniform(0.75, 1.0, size=ndim)
        radii = r * elong / elong.mean()
        rotation = _rotation(rng, ndim)
        harmonics = []
        for frequency in (2.0, 3.0, 4.0):
            axis = rng.normal(size=ndim)
            harmonics.append((axis / np.linalg.norm(axis), rng.uniform(0, 0.08), frequency))
        reach = 1.4 * radii.max() / scale
        lo = np.maximum(np.floor(c - reach), 0).astype(int)
        hi = np.minimum(np.ceil(c + reach) + 1, shape).astype(int)
        if np.any(hi <= lo):
            continue
        grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        coords = np.stack([(g - ci) * s for g, ci, s in zip(grids, c, scale)], axis=-1)
        dist = _scaled_distance(coords, radii, rotation, harmonics).astype(np.float32)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        claim = (dist < 1.0) & (dist < best[box])
        best[box][claim] = dist[claim]
        labels[box][claim] = i
        level = rng.uniform(0.35, 1.0)
        if rare[i - 1]:
            level = 1.6
            smooth[box][claim] = True
        brightness[box][claim] = level * (1.0 - 0.3 * dist[claim] ** 2)

    # Relabel 1..n in case a blob lost all its pixels to its neighbours.
    present = np.unique(labels[labels > 0])
    lut = np.zeros(labels.max() + 1, dtype=np.int32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    rare_labels = lut[[i for i in present if rare[i - 1]]]
    labels = lut[labels]

    texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
    texture /= texture.std() + 1e-6
    signal = brightness * np.where(smooth, 1.0, 1.0 + 0.15 * texture) * (labels > 0)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    direction = rng.normal(size=ndim)
    illumination = 1.0 + 0.3 * sum(d * g for d, g in zip(direction / np.linalg.norm(direction), grid))
    photons = 800.0 * ndimage.gaussian_filter(signal * illumination, 1.0) + 60.0
    noisy = rng.poisson(np.clip(photons, 0, None)).astype(np.float32) + rng.normal(0, 8.0, size=shape)
    image = np.clip(noisy + 100.0, 0, 65535).astype(np.uint16)
    if rare_fraction > 0:
        return image, labels, np.asarray(rare_labels, dtype=np.int32)
    return image, labels
