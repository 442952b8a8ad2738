"""The images of a package: its test tensors (with bioflow's own prediction of them), sample images
and cover."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bioflow.bioimageio.description import ExportError, Geometry, Layout
from bioflow.errors import BioflowError

#: Largest edge of the test image (2D / 3D): the package stays small and its test fast.
_TEST_EDGE = {2: 256, 3: 48}


def sample_image(task, config: Mapping[str, Any], geo: Geometry) -> tuple[np.ndarray, str]:
    """A raw channel-first image for the test tensors (the first held-out test image, cropped to a
    valid size, when the data can be read; else a generated one) and where it came from."""
    why = "the model records no test split"
    try:
        from bioflow.loading import recorded_data

        data = recorded_data(config, task)
        if data.splits["test"]:
            record = data.splits["test"][0]
            origin = f"the held-out test image `{record.name}` of the training data"
            return crop_to_valid(np.asarray(record.image), geo), origin
    except (BioflowError, OSError, ValueError, KeyError) as exc:
        why = f"the training data could not be read: {' '.join(str(exc).split())[:160]}"
    image = generated_image(task.data_info.in_channels, task.data_info.spatial_dims, geo)
    return crop_to_valid(image, geo), f"a generated image (smoothed noise; {why})"


def generated_image(channels: int, dims: int, geo: Geometry) -> np.ndarray:
    from scipy import ndimage

    from bioflow.inference.tiling import padded_size

    rng = np.random.default_rng(0)
    edge = max(geo.minimum, padded_size(_TEST_EDGE[dims] // 2, geo.step))
    noise = rng.normal(size=(channels,) + (edge,) * dims)
    smooth = np.stack([ndimage.gaussian_filter(c, 2.0) for c in noise])
    smooth = (smooth - smooth.min()) / max(float(np.ptp(smooth)), 1e-6)
    return (smooth * 200 + 20).astype(np.float32)


def crop_to_valid(image: np.ndarray, geo: Geometry) -> np.ndarray:
    """The centre of ``image`` with a valid size on every spatial axis (reflected when too small)."""
    dims = image.ndim - 1
    cap = max(geo.minimum, _TEST_EDGE[dims] // geo.step * geo.step)
    pads, boxes = [(0, 0)], [slice(None)]
    for size in image.shape[1:]:
        target = max(geo.minimum, min(cap, geo.minimum + (size - geo.minimum) // geo.step * geo.step))
        start = max(0, (size - target) // 2)
        boxes.append(slice(start, start + min(size, target)))
        pads.append((0, max(0, target - size)))
    out = np.asarray(image[tuple(boxes)], dtype=np.float32)
    if any(p[1] for p in pads):
        out = np.pad(out, pads, mode="reflect" if min(out.shape[1:]) > 1 else "edge")
    return np.ascontiguousarray(out)


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def apply_ops(x: np.ndarray, ops: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """bioflow's reading of the post-processing ops it writes, on ``(N, C, *spatial)`` arrays."""
    for op in ops:
        kwargs = op.get("kwargs", {})
        if op["id"] == "softmax":
            x = _softmax(x, 1)
        elif op["id"] == "sigmoid":
            x = 1.0 / (1.0 + np.exp(-x))
        elif op["id"] == "clip":
            x = np.clip(x, kwargs.get("min"), kwargs.get("max"))
        elif op["id"] == "scale_linear":
            shape = (1, -1) + (1,) * (x.ndim - 2)
            x = x * np.reshape(kwargs["gain"], shape) + np.reshape(kwargs["offset"], shape)
        else:
            raise ExportError(f"export: no reference implementation of the operation {op['id']}")
    return x.astype(np.float32)


def reference_outputs(task, image: np.ndarray, lay: Layout) -> list[np.ndarray]:
    """bioflow's own prediction of ``image`` (whole, one pass), as the package's output tensors."""
    import torch

    x = normalized(task, image)
    with torch.no_grad():
        raw = task.package_network()(torch.from_numpy(x)[None]).float().numpy()
    if raw.shape[1] != sum(lay.output_channels):
        raise ExportError(f"export: the network gives {raw.shape[1]} output channels, the task's package_outputs() "
                          f"declare {sum(lay.output_channels)}")
    bounds = np.cumsum([0] + lay.output_channels)
    return [apply_ops(raw[:, bounds[i]:bounds[i + 1]], out.postprocessing) for i, out in enumerate(lay.outputs)]


def normalized(task, image: np.ndarray) -> np.ndarray:
    """``image`` normalised as the model's network sees it."""
    return task.normalizer().norm_for(image)(image)


# -- images for humans ---------------------------------------------------------------------------------
def _display(array: np.ndarray) -> np.ndarray:
    """A 2D view of a (C, *spatial) array: the middle plane of volumes, first channel."""
    a = array[0]
    while a.ndim > 2:
        a = a[a.shape[0] // 2]
    return a


def write_cover(path: Path, image: np.ndarray, output: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, a, label in zip(axes, (_display(image), _display(output)), ("input", title)):
        lo, hi = np.percentile(a, [1, 99.8])
        ax.imshow(a, cmap="gray" if label == "input" else "magma", vmin=lo, vmax=max(hi, lo + 1e-6))
        ax.set_title(label)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_sample(path: Path, tensor: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(str(path), np.ascontiguousarray(tensor[0].squeeze()))
