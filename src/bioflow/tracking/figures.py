"""Validation figures: what a person looks at to judge a model, logged with the run every epoch.

For each of a few fixed validation images, one row: the whole input with the zoomed region
marked, then the region at full resolution — input (with the outlines of the predicted objects
for segmentation), prediction, and ground truth when there is one. Titles give the image's
score (Dice, matching accuracy, PSNR; for restoration also the PSNR of the input itself, so the
gain shows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

#: Side of the full-resolution region shown beside each overview (pixels).
ZOOM = 128


def display_plane(array: Any) -> np.ndarray:
    """A 2D view: the first channel of a channel-first image, the middle slice of a volume."""
    a = np.asarray(array)
    if a.ndim >= 3 and a.shape[0] <= 4 and a.ndim in (3, 4):
        a = a[0]
    while a.ndim > 2:
        a = a[a.shape[0] // 2]
    return a


def outlines(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label image whose right or lower neighbour has another label (object borders)."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    edge[:-1] |= lab[:-1] != lab[1:]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[1:] |= lab[1:] != lab[:-1]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    return edge & (lab > 0)


def zoom_box(shape: Sequence[int], focus: np.ndarray | None, side: int = ZOOM) -> tuple[slice, slice]:
    """A ``side`` x ``side`` region (clipped to the image) around the densest part of ``focus``."""
    h, w = int(shape[0]), int(shape[1])
    sy, sx = min(side, h), min(side, w)
    cy, cx = h // 2, w // 2
    if focus is not None and np.asarray(focus).any():
        mass = np.asarray(focus, dtype=np.float64) > 0
        # the densest window: box sums from an integral image, on a coarse stride
        integral = np.pad(mass.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        stride = max(1, side // 8)
        best, best_sum = (0, 0), -1.0
        for y in range(0, h - sy + 1, stride):
            for x in range(0, w - sx + 1, stride):
                total = integral[y + sy, x + sx] - integral[y, x + sx] - integral[y + sy, x] + integral[y, x]
                if total > best_sum:
                    best, best_sum = (y, x), total
        return slice(best[0], best[0] + sy), slice(best[1], best[1] + sx)
    y0, x0 = max(0, cy - sy // 2), max(0, cx - sx // 2)
    return slice(y0, y0 + sy), slice(x0, x0 + sx)


def _title(sample: Mapping[str, Any], what: str) -> str:
    scores = sample.get("scores") or {}
    text = ", ".join(f"{k} {v:.3g}" for k, v in scores.items() if what == "prediction" or k.startswith("input"))
    return f"{what}" + (f"\n{text}" if text else "")


def render_samples(samples: list[dict[str, Any]], path: Path, title: str) -> None:
    """Save the rows of ``samples`` (``name``, ``image``, ``prediction``, optional ``target`` and
    ``scores``) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    columns = 3 + any(s.get("target") is not None for s in samples)
    fig, axes = plt.subplots(len(samples), columns, figsize=(3.4 * columns, 3.6 * len(samples)), squeeze=False)
    for row, sample in zip(axes, samples):
        image = display_plane(sample["image"])
        prediction = display_plane(sample["prediction"])
        target = None if sample.get("target") is None else display_plane(sample["target"])
        labels = np.issubdtype(prediction.dtype, np.integer)
        box = zoom_box(image.shape, target if labels and target is not None else prediction if labels else None)
        lo, hi = np.percentile(image, [1, 99.8])
        row[0].imshow(image, cmap="gray", vmin=lo, vmax=hi)
        row[0].add_patch(Rectangle((box[1].start - 0.5, box[0].start - 0.5), box[1].stop - box[1].start,
                                   box[0].stop - box[0].start, fill=False, edgecolor="yellow", linewidth=1))
        row[0].set_title(f"{sample['name']} {image.shape[0]}x{image.shape[1]}", fontsize=8)
        crop = image[box]
        row[1].imshow(crop, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        if labels:
            edge = outlines(prediction[box])
            overlay = np.zeros(edge.shape + (4,))
            overlay[edge] = (1.0, 0.2, 0.2, 1.0)
            row[1].imshow(overlay, interpolation="nearest")
            row[1].set_title("input, predicted outlines", fontsize=8)
        else:
            row[1].set_title(_title(sample, "input"), fontsize=8)
        if labels:
            top = max(int(prediction.max()), int(target.max()) if target is not None else 0, 1)
            style: dict[str, Any] = {"cmap": _label_colours(top), "vmin": 0, "vmax": top}
        else:
            ref = target if target is not None else prediction
            style = {"cmap": "gray", "vmin": float(np.percentile(ref, 1)), "vmax": float(np.percentile(ref, 99.8))}
        row[2].imshow(prediction[box], interpolation="nearest", **style)
        row[2].set_title(_title(sample, "prediction"), fontsize=8)
        if columns == 4:
            if target is not None:
                row[3].imshow(target[box], interpolation="nearest", **style)
                row[3].set_title("ground truth", fontsize=8)
            row[3].axis("off")
        for ax in row[:3]:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _label_colours(top: int):
    """Distinct colours for labels 1..top on black (instances; class maps too)."""
    from matplotlib.colors import ListedColormap

    rng = np.random.default_rng(0)
    colours = np.concatenate([[[0.0, 0.0, 0.0]], 0.25 + 0.75 * rng.random((max(top, 1), 3))])
    return ListedColormap(colours)
