"""``bioflow export``: a trained model as a BioImage Model Zoo package (bioimage.io, spec v0.5).

The package holds the network as ``pytorch_state_dict`` (with a torch-only architecture source,
for bioflow's U-Net and StarDist networks), ``torchscript`` and, where the network exports,
``onnx``; the input normalisation and the output mapping in the format's own operations; axes with
a parametrised size (the network's size multiple) and a halo (half its receptive field); test
tensors (an image of the held-out test split when the data can be read, else a generated image)
with bioflow's own prediction of them; a sample image per tensor, a cover and a README.

What the format cannot express goes into its ``config`` section: StarDist's non-maximum
suppression (thresholds, rays, grid, in the layout of StarDist's own exporter, under
``config.stardist``) and, under ``config.bioflow``, the training config, data info and receptive
field that ``bioflow predict`` and ``bioflow evaluate`` use to treat the package exactly as the
checkpoint it came from.
"""

from __future__ import annotations

import datetime
import getpass
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bioflow.errors import BioflowError
from bioflow.bioimageio.runtime import first_error, require_core

#: The papers of the methods (cited by every package of that task).
METHOD_CITATIONS: dict[str, list[dict[str, str]]] = {
    "segmentation": [{"text": "Ronneberger, Fischer and Brox. U-Net: Convolutional Networks for Biomedical Image "
                              "Segmentation. MICCAI 2015", "doi": "10.1007/978-3-319-24574-4_28"}],
    "stardist": [{"text": "Schmidt, Weigert, Broaddus and Myers. Cell Detection with Star-Convex Polygons. "
                          "MICCAI 2018", "doi": "10.1007/978-3-030-00934-2_30"}],
    "care": [{"text": "Weigert et al. Content-aware image restoration: pushing the limits of fluorescence "
                      "microscopy. Nature Methods 2018", "doi": "10.1038/s41592-018-0216-7"}],
    "n2v": [{"text": "Krull, Buchholz and Jug. Noise2Void - Learning Denoising From Single Noisy Images. "
                     "CVPR 2019", "doi": "10.1109/CVPR.2019.00223"}],
}
TASK_TITLES = {"segmentation": "U-Net segmentation", "stardist": "StarDist", "care": "CARE restoration",
               "n2v": "Noise2Void denoising"}
TASK_TAGS = {"segmentation": ["semantic-segmentation", "unet"], "stardist": ["instance-segmentation", "stardist", "nuclei"],
             "care": ["restoration", "denoising", "care"], "n2v": ["denoising", "n2v", "self-supervised"]}
DEFAULT_LICENSE = "CC-BY-4.0"
INPUT_ID = "raw"
#: Largest edge of the test image (2D / 3D): the package stays small and its test fast.
_TEST_EDGE = {2: 256, 3: 48}
_SPATIAL_IDS = {2: ["y", "x"], 3: ["z", "y", "x"]}


class ExportError(BioflowError):
    """The model cannot be exported as asked."""


@dataclass
class OutputTensor:
    """One output tensor of the package: id, channel names, post-processing, what it holds."""

    id: str
    channel_names: list[str]
    postprocessing: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""


@dataclass
class Layout:
    """How the network's input and outputs appear in the package."""

    preprocessing: list[dict[str, Any]]
    outputs: list[OutputTensor]
    notes: list[str]

    @property
    def output_channels(self) -> list[int]:
        return [len(o.channel_names) for o in self.outputs]


# -- what the network's tensors mean -----------------------------------------------------------------
def normalization_ops(normalizer, channels: int, spatial_ids: Sequence[str]) -> tuple[list[dict], list[dict], str]:
    """The package's preprocessing for bioflow's normalisation, the inverse mapping as output
    post-processing when the format can express it, and a sentence saying what was done."""
    ensure = [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
    if normalizer.mode == "per_image":
        kwargs = {"axes": list(spatial_ids), "min_percentile": normalizer.low, "max_percentile": normalizer.high}
        return ensure + [{"id": "scale_range", "kwargs": kwargs}], [], (
            f"each image is normalised by its own percentiles ({normalizer.low:g} -> 0, {normalizer.high:g} -> 1, "
            "per channel): `scale_range` per sample")
    if normalizer.mode == "none":
        return ensure, [], "images are used as they are (no normalisation)"
    low, high = np.asarray(normalizer.fixed.low, np.float64), np.asarray(normalizer.fixed.high, np.float64)
    scale = np.maximum(high - low, 1e-6)
    gain, offset = 1.0 / scale, -low / scale

    def linear(g: np.ndarray, o: np.ndarray) -> dict:
        if channels == 1:
            return {"id": "scale_linear", "kwargs": {"gain": float(g[0]), "offset": float(o[0])}}
        return {"id": "scale_linear", "kwargs": {"axis": "channel", "gain": g.tolist(), "offset": o.tolist()}}

    return ensure + [linear(gain, offset)], [linear(scale, low)], (
        f"every image is normalised with the fixed percentiles ({normalizer.low:g}, {normalizer.high:g}) of the "
        f"training split (low {low.round(4).tolist()}, high {high.round(4).tolist()}): `scale_linear`")


def layout(task) -> Layout:
    """Preprocessing and outputs of ``task``'s package."""
    info = task.data_info
    name = task.config["task"]["name"]
    spatial = _SPATIAL_IDS[info.spatial_dims]
    pre, inverse, norm_note = normalization_ops(task.normalizer(), info.in_channels, spatial)
    notes = [f"Input: {norm_note}."]
    if name == "segmentation":
        classes = task.task_settings["class_names"] or [f"class{i}" for i in range(task.out_channels())]
        outputs = [OutputTensor("probabilities", [str(c) for c in classes], [{"id": "softmax", "kwargs": {"axis": "channel"}}],
                                "class probabilities (softmax); the class map is their argmax")]
    elif name == "stardist":
        rays = [f"ray{i}" for i in range(task.n_rays)]
        outputs = [
            OutputTensor("prob", ["object_probability"], [{"id": "sigmoid"}], "object probability on the grid"),
            OutputTensor("dist", rays, [{"id": "clip", "kwargs": {"min": 0.0}}],
                         "distances to the object boundary along each ray (full-resolution pixels)"),
        ]
        gy, gx = task.grid
        notes.append(
            f"Outputs: object probability and {task.n_rays} ray distances on a grid of {gy}x{gx} pixels (the outputs are "
            f"{gy}x{gx} times smaller than the input). The star-convex polygons need StarDist's non-maximum suppression, "
            "which the format cannot express: its thresholds, rays and grid are in `config.stardist`; "
            "`bioflow predict` runs it and writes label images.")
    elif name in ("care", "n2v"):
        channels = [f"channel{i}" for i in range(info.in_channels)]
        outputs = [OutputTensor("restored", channels, list(inverse), "restored image")]
        if inverse:
            notes.append("Output: mapped back to the input's intensity units with the inverse of the input normalisation (`scale_linear`).")
        elif task.normalizer().mode == "per_image":
            notes.append(
                "Output: in the normalised range of the input (its percentiles map to 0 and 1). Mapping it back to the "
                "input's intensity units needs the percentiles of the input, which the format's post-processing cannot "
                "refer to; `bioflow predict` does it, other tools show the normalised image.")
    else:
        raise ExportError(f"export: no bioimage.io layout for the task '{name}'")
    return Layout(pre, outputs, notes)


# -- geometry ------------------------------------------------------------------------------------------
@dataclass
class Geometry:
    """Valid input sizes (``min + n * step``), halo and output stride of a network."""

    minimum: int
    step: int
    halo: int  # input pixels
    stride: tuple[int, ...]
    receptive_field: int

    def output_halo(self, axis: int) -> int:
        return -(-self.halo // self.stride[axis])


def geometry(task) -> Geometry:
    from bioflow.inference.tiling import context_margin, padded_size

    rf = int(task.receptive_field())
    multiple = int(task.size_multiple)
    stride = tuple(int(g) for g in (task.output_stride() or (1,) * task.data_info.spatial_dims))
    g = max(stride)
    halo = -(-context_margin(rf) // g) * g
    return Geometry(padded_size(2 * halo + g, multiple), multiple, halo, stride, rf)


# -- the test image ------------------------------------------------------------------------------------
def sample_image(task, config: Mapping[str, Any], geo: Geometry) -> tuple[np.ndarray, str]:
    """A raw channel-first image for the test tensors (the first held-out test image, cropped to a
    valid size, when the data can be read; else a generated one) and where it came from."""
    why = "the model records no test split"
    try:
        from bioflow.evaluation import recorded_data

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

    x = task.normalizer().norm_for(image)(image)
    with torch.no_grad():
        raw = task.model(torch.from_numpy(x)[None]).float().numpy()
    bounds = np.cumsum([0] + lay.output_channels)
    return [apply_ops(raw[:, bounds[i]:bounds[i + 1]], out.postprocessing) for i, out in enumerate(lay.outputs)]


# -- metadata and README -------------------------------------------------------------------------------
def run_metrics(run_id: str | None, store) -> dict[str, float]:
    """The held-out test figures of the model's MLflow run, if the store has the run."""
    if run_id is None:
        return {}
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(store.tracking_uri).get_run(run_id)
    except Exception:
        return {}
    return {k: float(v) for k, v in sorted(run.data.metrics.items()) if k.startswith("test/")}


def _format_source(config: Mapping[str, Any]) -> str:
    from bioflow.config import component

    name, kwargs = component(config["data"]["source"])
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items() if v is not None)
    return f"`{name}`" + (f" ({args})" if args else "")


CAVEATS = {
    "segmentation": "The class probabilities are only as good as the training masks; check them on images of your own "
                    "acquisition setting before quantifying.",
    "stardist": "StarDist assumes star-convex objects (nuclei and similar): other shapes are cut into star-convex pieces "
                "or merged. Objects much larger than the receptive field are not found whole.",
    "care": "CARE applies only to data like its training data: the same sample type, microscope and acquisition "
            "settings. It reproduces what its training targets contain, noise included, and it can hallucinate "
            "plausible structures that are not in the sample: check results against the raw data, and do not use it "
            "for images unlike its training images.",
    "n2v": "Noise2Void removes only noise that is independent from pixel to pixel. Structured or correlated noise (stripes, "
           "scan lines, camera patterns) stays and can leave artefacts. The blind-spot training smooths fine detail of "
           "one pixel's size.",
}


def readme(task, config, lay: Layout, geo: Geometry, *, name: str, origin: str, metrics: Mapping[str, float],
           metrics_origin: str, authors, license_id: str, cites, weights: Sequence[str], weight_notes: Sequence[str]) -> str:
    info = task.data_info
    task_name = config["task"]["name"]
    split = {k: len(v) for k, v in (info.split or {}).items()}
    pixel = "x".join(f"{p:g}" for p in info.pixel_size) + " µm" if info.pixel_size else "not recorded"
    lines = [
        f"# {name}", "",
        f"A {TASK_TITLES[task_name]} model ({info.spatial_dims}D, {info.in_channels} input channel(s)) trained with bioflow "
        f"{_version()} and exported as a BioImage Model Zoo package.", "",
        "## Training data", "",
        f"- source: {_format_source(config)}",
        f"- split (images): {', '.join(f'{k} {v}' for k, v in split.items()) or 'not recorded'}",
        f"- pixel size: {pixel}",
        f"- patches of {config['data']['patch_size']}, {config['trainer'].get('max_epochs')} epoch(s); seed {config['seed']}",
        "", "## Validation", "",
        "Scores on the held-out test split, which took no part in training or in choosing checkpoints and thresholds.", "",
    ]
    if metrics:
        lines += [f"From {metrics_origin}:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k.split('/', 1)[-1]} | {v:.4f} |" for k, v in metrics.items()]
    else:
        lines.append("None recorded with the model (run `bioflow evaluate model.zip` where its data can be read).")
    lines += ["", "## Inputs, outputs and processing", ""] + [f"- {n}" for n in lay.notes] + [
        f"- Input axes: batch, channel, {', '.join(_SPATIAL_IDS[info.spatial_dims])}; valid sizes {geo.minimum} + n × {geo.step} "
        "pixels per spatial axis.",
        f"- Receptive field {geo.receptive_field} pixels: each output pixel sees {geo.receptive_field} input pixels along each "
        f"axis; the halo of {geo.halo} pixels is what tiled prediction discards at inner tile edges.",
        f"- Test tensors: from {origin}, predicted by bioflow with the original checkpoint.",
        f"- Weights: {', '.join(weights)}." + "".join(f" {n}" for n in weight_notes),
        "", "## Caveats", "",
        f"- {CAVEATS[task_name]}",
        "- Resolution: a CNN is not scale invariant. Apply the model at the pixel size it was trained on "
        f"({pixel}); objects at another scale than in training are missed or split.",
        f"- Image borders: the network zero-pads its convolutions, so predictions within {geo.halo} pixels of the image border "
        "differ slightly between tools that pad the image first (by the halo, as bioimageio.core does) and those that do not "
        "(bioflow).",
        "", "## Licence, authors and citation", "",
        f"Licence: {license_id}. Authors: {', '.join(a['name'] for a in authors)}.", "", "Cite:", "",
    ]
    lines += [f"- {c['text']}" + (f" (doi: {c['doi']})" if c.get("doi") else f" ({c['url']})" if c.get("url") else "") for c in cites]
    lines += ["", "## Use", "",
              "- Check it: `bioimageio test model.zip`.",
              "- Predict with bioflow: `bioflow predict model.zip images/ --out results/` (tiled, any image size).",
              "- Open it in napari, Fiji/deepImageJ or any tool that reads bioimage.io models.", ""]
    return "\n".join(lines)


def _version() -> str:
    from bioflow import __version__

    return __version__


def parse_cite(item: str) -> dict[str, str]:
    """``TEXT=DOI`` or ``TEXT=URL`` (a bare DOI or URL is its own text)."""
    text, sep, ref = item.rpartition("=")
    if not sep:
        text, ref = item, item
    text, ref = text.strip() or ref.strip(), ref.strip()
    if ref.startswith(("http://", "https://")):
        return {"text": text, "url": ref}
    if ref.startswith("10.") and "/" in ref:
        return {"text": text, "doi": ref}
    raise ExportError(f"--cite {item!r}: give TEXT=DOI (e.g. 10.1234/abcd) or TEXT=URL")


def default_author() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


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


# -- the package -----------------------------------------------------------------------------------------
def _axes(dims: int, channel_names: Sequence[str], geo: Geometry, pixel_size, *, output: bool, axis_scale=None) -> list[dict]:
    axes: list[dict] = [{"type": "batch"}, {"type": "channel", "channel_names": list(channel_names)}]
    for i, axis in enumerate(_SPATIAL_IDS[dims]):
        entry: dict[str, Any] = {"type": "space", "id": axis}
        scale = float(pixel_size[i]) if pixel_size else 1.0
        if output:
            entry["size"] = {"tensor_id": INPUT_ID, "axis_id": axis}
            entry["halo"] = geo.output_halo(i)
            scale *= geo.stride[i]
        else:
            entry["size"] = {"min": geo.minimum, "step": geo.step}
        entry["scale"] = scale
        if pixel_size:
            entry["unit"] = "micrometer"
        axes.append(entry)
    return axes


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def write_weights(task, folder: Path, lay: Layout, example: np.ndarray) -> tuple[dict[str, Any], list[str]]:
    """The weights entries of the package (files written into ``folder``) and notes on them."""
    import torch

    from bioflow.bioimageio import networks

    net = task.model.eval()
    weights: dict[str, Any] = {}
    notes: list[str] = []
    version = _torch_version()
    source = networks.torch_source(task)
    parent = None
    x = torch.from_numpy(example)
    with torch.no_grad():
        reference = net(x)
    if source is not None:
        networks.check_torch_only(source.text)
        rebuilt = networks.build_from_source(source)
        rebuilt.load_state_dict(networks.state_dict(net), strict=True)
        with torch.no_grad():
            again = torch.cat(list(_as_tuple(rebuilt.eval()(x))), dim=1)
        # Up to float32 rounding at the output's scale: the training layout (channels-last) and
        # the rebuilt one may sum the same products in another order.
        scale = max(1.0, float(reference.abs().max()))
        if not torch.allclose(again, reference, rtol=1e-5, atol=1e-5 * scale):
            raise ExportError("export: the torch-only source of the network does not reproduce it (a bug: please report it)")
        (folder / "architecture.py").write_text(source.text)
        torch.save(networks.state_dict(net), folder / "weights.pt")
        weights["pytorch_state_dict"] = {
            "source": "weights.pt", "pytorch_version": version,
            "architecture": {"source": "architecture.py", "callable": source.callable, "kwargs": source.kwargs},
        }
        parent = "pytorch_state_dict"
    else:
        notes.append("The architecture comes from a plugin and has no torch-only source, so the package holds no "
                     "`pytorch_state_dict` weights: TorchScript needs no source.")
    split = networks.SplitOutputs(_plain_copy(net), lay.output_channels).eval()
    (folder / "weights_torchscript.pt").write_bytes(networks.torchscript_bytes(split))
    weights["torchscript"] = {"source": "weights_torchscript.pt", "pytorch_version": version}
    if parent:
        weights["torchscript"]["parent"] = parent
    parent = parent or "torchscript"
    try:
        data = networks.onnx_bytes(split, x, [o.id for o in lay.outputs], INPUT_ID)
    except Exception as exc:  # the net does not export: the other formats suffice
        notes.append(f"No ONNX weights: the network does not export to ONNX ({type(exc).__name__}).")
    else:
        (folder / "weights.onnx").write_bytes(data)
        weights["onnx"] = {"source": "weights.onnx", "opset_version": 17, "parent": parent}
    return weights, notes


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _plain_copy(net):
    """A copy of the network in the default memory layout (what TorchScript and ONNX should record)."""
    import copy
    import inspect

    import torch

    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format).float().cpu()
    for module in plain.modules():  # properties (size_multiple, ...) describe the net; forward needs none
        cls = type(module)
        names = [k for k, v in inspect.getmembers(cls) if isinstance(v, property) and not k.startswith("_")]
        if names and not cls.__module__.startswith("torch."):
            module.__class__ = type(cls.__name__, (cls,), {"__jit_unused_properties__": names, "__module__": cls.__module__})
    return plain


@dataclass
class ExportResult:
    path: Path
    name: str
    weights: list[str]
    test_origin: str
    notes: list[str]


def export_model(
    model: str,
    out: str,
    *,
    project_dir: str,
    tracking_uri: str | None = None,
    authors: Sequence[str] = (),
    license_id: str | None = None,
    cites: Sequence[str] = (),
    name: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the bioimage.io package of ``model`` (a checkpoint file or an MLflow run id) to ``out``."""
    target = Path(out)
    if target.suffix.lower() != ".zip":
        raise ExportError(f"--out {out}: a bioimage.io package is a .zip file; name it e.g. model.zip")
    if target.exists() and not overwrite:
        raise ExportError(f"{target}: exists already; choose another --out or pass --overwrite")
    if target.is_dir():
        raise ExportError(f"{target}: is a folder")
    require_core()
    citations = [parse_cite(c) for c in cites]
    from bioflow.loading import load_model
    from bioflow.tracking.store import Store

    store = Store.create(project_dir, tracking_uri)
    loaded = load_model(model, store)
    task = loaded.task.cpu().eval()
    config = loaded.checkpoint["hyper_parameters"]["config"]
    task_name = config["task"]["name"]
    info = task.data_info
    lay = layout(task)
    geo = geometry(task)
    image, origin = sample_image(task, config, geo)
    outputs = reference_outputs(task, image, lay)
    metrics = run_metrics(loaded.run_id, store)
    metrics_origin = f"MLflow run {loaded.run_id}" if metrics else ""
    title = name or f"bioflow {TASK_TITLES[task_name]} {config['logger'].get('experiment_name') or ''}".strip()
    author_list = [{"name": a} for a in (authors or [default_author()])]
    license_id = license_id or DEFAULT_LICENSE
    cite_list = citations + METHOD_CITATIONS[task_name]

    with tempfile.TemporaryDirectory(prefix=".bioflow-export-", dir=target.parent if target.parent.exists() else None) as tmp:
        folder = Path(tmp)
        weights, weight_notes = write_weights(task, folder, lay, _normalized(task, image)[None])
        np.save(folder / "test_input.npy", image[None])
        write_sample(folder / "sample_input.tif", image[None])
        output_descrs = []
        for out_t, tensor in zip(lay.outputs, outputs):
            np.save(folder / f"test_output_{out_t.id}.npy", tensor)
            write_sample(folder / f"sample_output_{out_t.id}.tif", tensor)
            output_descrs.append({
                "id": out_t.id, "description": out_t.description[:128],
                "axes": _axes(info.spatial_dims, out_t.channel_names, geo, info.pixel_size, output=True),
                "test_tensor": {"source": f"test_output_{out_t.id}.npy"},
                "sample_tensor": {"source": f"sample_output_{out_t.id}.tif"},
                "data": {"type": "float32"}, "postprocessing": out_t.postprocessing,
            })
        write_cover(folder / "cover.png", image, outputs[0][0], lay.outputs[0].id)
        (folder / "README.md").write_text(readme(
            task, config, lay, geo, name=title, origin=origin, metrics=metrics, metrics_origin=metrics_origin,
            authors=author_list, license_id=license_id, cites=cite_list, weights=list(weights), weight_notes=weight_notes,
        ))
        rdf = {
            "format_version": "0.5.12", "type": "model", "name": title,
            "description": f"{TASK_TITLES[task_name]} ({info.spatial_dims}D) trained with bioflow on {_format_source(config)}"[:1024],
            "authors": author_list, "cite": cite_list, "license": license_id,
            "tags": ["bioflow", "pytorch", f"{info.spatial_dims}d", "fluorescence-light-microscopy", *TASK_TAGS[task_name]],
            "documentation": {"source": "README.md"}, "covers": [{"source": "cover.png"}],
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "inputs": [{
                "id": INPUT_ID, "description": "raw image",
                "axes": _axes(info.spatial_dims, [f"channel{i}" for i in range(info.in_channels)], geo, info.pixel_size, output=False),
                "test_tensor": {"source": "test_input.npy"}, "sample_tensor": {"source": "sample_input.tif"},
                "data": {"type": "float32"}, "preprocessing": lay.preprocessing,
            }],
            "outputs": output_descrs,
            "weights": weights,
            "config": package_config(task, loaded, geo, lay),
        }
        _write_yaml(folder / "rdf.yaml", rdf)
        descr = _validated(folder / "rdf.yaml")
        _package(descr, target)
    return ExportResult(target, title, list(weights), origin, weight_notes)


def _normalized(task, image: np.ndarray) -> np.ndarray:
    return task.normalizer().norm_for(image)(image)


def package_config(task, loaded, geo: Geometry, lay: Layout) -> dict[str, Any]:
    """The ``config`` section: bioflow's own record, StarDist's post-processing parameters."""
    hparams = loaded.checkpoint["hyper_parameters"]
    config: dict[str, Any] = {
        "bioflow": {
            "version": _version(), "task": hparams["config"]["task"]["name"], "run_id": loaded.run_id,
            "receptive_field": geo.receptive_field, "size_multiple": geo.step,
            "outputs": [o.id for o in lay.outputs],
            "config": hparams["config"], "data_info": hparams["data_info"],
        },
    }
    if hparams["config"]["task"]["name"] == "stardist":
        prob, nms = (float(t) for t in task.thresholds)
        s = task.task_settings
        config["stardist"] = {
            "thresholds": {"prob": prob, "nms": nms},
            "config": {
                "n_dim": 2, "axes": "YXC", "n_channel_in": task.data_info.in_channels, "n_channel_out": 1 + task.n_rays,
                "n_rays": task.n_rays, "grid": [int(g) for g in task.grid], "nms_criterion": s["criterion"],
                "backbone": "unet", "exported_by": "bioflow",
            },
        }
    return config


def _write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(_plain(data), sort_keys=False, allow_unicode=True))


def _plain(value: Any) -> Any:
    """Plain YAML types (tuples to lists, numpy scalars to Python numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _validated(rdf: Path):
    from bioimageio.spec import load_description
    from bioimageio.spec.model.v0_5 import ModelDescr

    descr = load_description(rdf, perform_io_checks=True)
    if not isinstance(descr, ModelDescr):
        raise ExportError(f"export: the package description is not valid ({first_error(descr.validation_summary)})")
    return descr


def _package(descr, target: Path) -> None:
    from bioimageio.spec import save_bioimageio_package

    partial = target.with_name(f".{target.name}.partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_bioimageio_package(descr, output_path=partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def check_package(path: Path) -> tuple[bool, str]:
    """``bioimageio test`` of a package: whether it passed and its summary line."""
    from bioimageio.core import test_model

    summary = test_model(str(path))
    passed = summary.status == "passed"
    line = f"bioimageio test {path.name}: {summary.status}"
    if not passed:
        line += f" ({first_error(summary)})"
    return passed, line


def run_export(args) -> int:
    """``bioflow export`` with parsed command-line arguments."""
    result = export_model(
        args.model, args.out, project_dir=args.project_dir, tracking_uri=args.tracking_uri, authors=args.author or (),
        license_id=args.license, cites=args.cite or (), name=args.name, overwrite=args.overwrite,
    )
    print(f"bioflow: {result.path}: bioimage.io package '{result.name}' (weights: {', '.join(result.weights)}; "
          f"test tensors from {result.test_origin})", flush=True)
    for note in result.notes:
        print(f"bioflow: note: {note}", file=sys.stderr)
    if not args.test:
        return 0
    passed, line = check_package(result.path)
    print(line, flush=True)
    return 0 if passed else 1
