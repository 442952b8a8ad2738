"""The description of a package (``rdf.yaml``, bioimage.io spec v0.5) from a task: what its tensors
mean, their axes and valid sizes, the package's config; validated by bioimage.io's own library.

Nothing here knows a task by name: what is special about a method comes from the task's exchange
hooks (:mod:`bioflow.tasks.exchange`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bioflow.bioimageio.package import PER_IMAGE_SCALE, PER_IMAGE_UNITS, first_error
from bioflow.errors import BioflowError
from bioflow.tasks.exchange import TASK_STATE, PackageOutput

INPUT_ID = "raw"
_SPATIAL_IDS = {2: ["y", "x"], 3: ["z", "y", "x"]}


class ExportError(BioflowError):
    """The model cannot be exported as asked."""


@dataclass
class Layout:
    """How the network's input and outputs appear in the package."""

    preprocessing: list[dict[str, Any]]
    outputs: list[PackageOutput]
    notes: list[str]
    per_image_units: list[str]  # outputs whose inverse normalisation only bioflow applies
    per_image_scale: list[str] = field(default_factory=list)  # the same for spreads (scale only)

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
    """Preprocessing and outputs of ``task``'s package (its ``package_outputs``, with the inverse of
    the input normalisation added to outputs in the input's units where the format can express it)."""
    info = task.data_info
    normalizer = task.normalizer()
    pre, inverse, norm_note = normalization_ops(normalizer, info.in_channels, _SPATIAL_IDS[info.spatial_dims])
    notes = [f"Input: {norm_note}."]
    outputs, per_image, per_image_scale = [], [], []
    for out in task.package_outputs():
        ops = list(out.postprocessing)
        kind = "an image" if out.in_input_units else "a spread" if out.in_input_scale else None
        back = inverse if out.in_input_units else [  # a spread: the scale of the inverse mapping, not its offset
            {**op, "kwargs": {**op["kwargs"], "offset": 0.0 if np.isscalar(op["kwargs"]["offset"])
                              else [0.0] * len(op["kwargs"]["offset"])}} for op in inverse]
        if kind and inverse:
            ops += back
            notes.append(f"Output `{out.id}`: {kind} mapped back to the input's intensity units with the inverse of "
                         "the input normalisation (`scale_linear`" + (", its scale only)." if out.in_input_scale else ")."))
        elif kind and normalizer.mode == "per_image":
            (per_image if out.in_input_units else per_image_scale).append(out.id)
            notes.append(
                f"Output `{out.id}`: {kind} in the normalised range of the input (its percentiles map to 0 and 1). Mapping "
                "it back to the input's intensity units needs the percentiles of the input, which the format's "
                f"post-processing cannot refer to; `bioflow predict` does it, other tools show the normalised {kind[2:]}.")
        outputs.append(PackageOutput(out.id, list(out.channel_names), ops, out.description, out.in_input_units,
                                     out.in_input_scale))
    if not outputs or len({o.id for o in outputs}) != len(outputs) or INPUT_ID in {o.id for o in outputs}:
        raise ExportError(f"export: the task's package_outputs() must name distinct outputs other than '{INPUT_ID}'")
    return Layout(pre, outputs, notes + list(task.package_notes()), per_image, per_image_scale)


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



def package_config(task, loaded, geo: Geometry, lay: Layout) -> dict[str, Any]:
    """The ``config`` section: bioflow's own record (``bioflow``: what ``bioflow predict`` and
    ``bioflow evaluate`` need to treat the package as its checkpoint) and the task's own sections."""
    from bioflow.version import __version__

    checkpoint = loaded.checkpoint
    hparams = checkpoint["hyper_parameters"]
    own = task.package_config()
    if "bioflow" in own:
        raise ExportError("export: the task's package_config() may not replace the section 'bioflow'")
    return {
        "bioflow": {
            "version": __version__, "task": hparams["config"]["task"]["name"], "run_id": loaded.run_id,
            "receptive_field": geo.receptive_field, "size_multiple": geo.step,
            "outputs": [o.id for o in lay.outputs], PER_IMAGE_UNITS: lay.per_image_units,
            PER_IMAGE_SCALE: lay.per_image_scale,
            "components": checkpoint.get("bioflow", {}).get("components", {}),
            TASK_STATE: task.task_state(),
            "config": hparams["config"], "data_info": hparams["data_info"],
        },
        **own,
    }


def description(task, *, name: str, summary: str, authors, cites, license_id: str, tags: Sequence[str],
                lay: Layout, geo: Geometry, weights: Mapping[str, Any], config: Mapping[str, Any], timestamp: str) -> dict:
    """The whole ``rdf.yaml`` of a package whose files (test tensors, samples, README, cover,
    weights) are named as :func:`bioflow.bioimageio.export.export_model` writes them."""
    info = task.data_info
    outputs = [{
        "id": o.id, "description": o.description[:128],
        "axes": _axes(info.spatial_dims, o.channel_names, geo, info.pixel_size, output=True),
        "test_tensor": {"source": f"test_output_{o.id}.npy"}, "sample_tensor": {"source": f"sample_output_{o.id}.tif"},
        "data": {"type": "float32"}, "postprocessing": o.postprocessing,
    } for o in lay.outputs]
    return {
        "format_version": "0.5.12", "type": "model", "name": name, "description": summary[:1024],
        "authors": list(authors), "cite": list(cites), "license": license_id, "tags": list(dict.fromkeys(tags)),
        "documentation": {"source": "README.md"}, "covers": [{"source": "cover.png"}], "timestamp": timestamp,
        "inputs": [{
            "id": INPUT_ID, "description": "raw image",
            "axes": _axes(info.spatial_dims, [f"channel{i}" for i in range(info.in_channels)], geo, info.pixel_size,
                          output=False),
            "test_tensor": {"source": "test_input.npy"}, "sample_tensor": {"source": "sample_input.tif"},
            "data": {"type": "float32"}, "preprocessing": lay.preprocessing,
        }],
        "outputs": outputs, "weights": dict(weights), "config": dict(config),
    }


def write_yaml(path: Path, data: Mapping[str, Any]) -> None:
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


def validated(rdf: Path):
    from bioimageio.spec import load_description
    from bioimageio.spec.model.v0_5 import ModelDescr

    descr = load_description(rdf, perform_io_checks=True)
    if not isinstance(descr, ModelDescr):
        raise ExportError(f"export: the package description is not valid ({first_error(descr.validation_summary)})")
    return descr


def save_package(descr, target: Path) -> None:
    from bioimageio.spec import save_bioimageio_package

    partial = target.with_name(f".{target.name}.partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_bioimageio_package(descr, output_path=partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
