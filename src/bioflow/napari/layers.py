"""Between napari layers and bioflow: an image layer's axes for a model, a prediction's results as
layers, and layers written as a training data set. No Qt here (the tests call these directly).

Layer data are napari's "layer data tuples": ``(data, keyword arguments, layer type)``.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bioflow.errors import DataError

LayerData = tuple[Any, dict[str, Any], str]


def guess_axes(shape: Sequence[int], spatial_dims: int, in_channels: int, rgb: bool = False, name: str = "the layer") -> str:
    """The axes of an image layer of ``shape`` for a model of ``spatial_dims`` dimensions and
    ``in_channels`` channels: extra leading axes are channels where their length is the model's
    channel count, else time points (a 2D model given a stack predicts it plane by plane)."""
    spatial = "ZYX"[-spatial_dims:]
    ndim = len(shape)
    if rgb:
        if spatial_dims != 2 or ndim != 3:
            raise DataError(f"{name}: an RGB layer of shape {tuple(shape)} for a {spatial_dims}D model")
        if in_channels != shape[-1]:
            raise DataError(f"{name}: an RGB layer ({shape[-1]} colour channels) for a model of {in_channels} "
                            f"channel(s); split the colours into layers (Layers > Split RGB) and choose one")
        return "YXC"
    if ndim < spatial_dims:
        raise DataError(f"{name}: {ndim}D data of shape {tuple(shape)} for a {spatial_dims}D model "
                        f"(it needs {spatial_dims} spatial axes)")
    if ndim == spatial_dims:
        if in_channels > 1:
            raise DataError(f"{name}: one channel of shape {tuple(shape)} for a model of {in_channels} channels "
                            f"(it takes a layer with its {in_channels} channels on the first axis)")
        return spatial
    if ndim == spatial_dims + 1:
        if in_channels > 1 and shape[0] == in_channels:
            return "C" + spatial
        if in_channels > 1:
            raise DataError(f"{name}: shape {tuple(shape)} for a {spatial_dims}D model of {in_channels} channels "
                            f"(its first axis should be the {in_channels} channels)")
        return "T" + spatial
    if ndim == spatial_dims + 2 and shape[1] == in_channels:
        return "TC" + spatial
    raise DataError(f"{name}: {ndim}D data of shape {tuple(shape)} for a {spatial_dims}D model of {in_channels} "
                    f"channel(s): it takes {spatial} (plus a leading channel or time axis)")


def check_layer_data(data: Any, name: str, multiscale: bool = False) -> np.ndarray:
    """A layer's data as one numpy array (the full resolution of a multiscale layer), checked."""
    if multiscale or (isinstance(data, (list, tuple)) and data and hasattr(data[0], "shape")):
        data = data[0]  # multiscale: the full resolution
    array = np.asarray(data)
    if array.size == 0:
        raise DataError(f"{name}: the layer is empty")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{name}: data of type {array.dtype} is not an image")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{name}: the layer holds NaN or infinite values")
    return array


def _scaled(values: Sequence[float] | None, axes: str, out_axes: str) -> list[float] | None:
    if values is not None and len(values) == len(axes) - 1 and axes.endswith("C"):
        axes = axes[:-1]  # an RGB layer: its scale leaves out the colour axis
    if values is None or len(values) != len(axes):
        return None
    return [float(values[axes.index(a)]) for a in out_axes]


def result_layers(result: Mapping[str, Any], source: str, axes: str, model, scale: Sequence[float] | None = None,
                  translate: Sequence[float] | None = None) -> list[LayerData]:
    """The outputs of ``model.predict`` (``result``) as layers placed on the source layer's grid,
    named after the source, the output and the model (its run, or its file).

    Integer outputs without channels become labels layers (with StarDist's per-object table as
    ``features`` for a single image); every other image becomes an image layer, one per channel
    when it has several. Tables and the fit verdict are not layers (the widget reports them)."""
    out_axes = "".join(a for a in axes if a not in "C")  # the outputs keep time and space
    place = {k: v for k, v in (("scale", _scaled(scale, axes, out_axes)), ("translate", _scaled(translate, axes, out_axes)))
             if v is not None}
    specs = {spec.name: spec for spec in model.task.prediction_outputs()}
    by = f" ({model.run_id[:8]})" if model.run_id else f" ({Path(str(model.checkpoint)).stem})" if getattr(model, "checkpoint", None) else ""
    layers: list[LayerData] = []
    for name, value in result.items():
        spec = specs.get(name)
        if name == "fit" or (spec is not None and spec.table) or not isinstance(value, np.ndarray):
            continue
        meta: dict[str, Any] = {"name": f"{source} {name}{by}", "metadata": {"bioflow": {"source": source, "output": name,
                                                                                   "run_id": model.run_id}}}
        if value.dtype.kind in "iu" and value.ndim == len(out_axes):
            meta.update(place)
            objects = result.get("objects")
            if name == "labels" and isinstance(objects, np.ndarray) and objects.dtype.names:
                meta["features"] = {"index": objects["label"], **{f: objects[f] for f in objects.dtype.names if f != "label"}}
            layers.append((value, meta, "labels"))
            continue
        data = np.asarray(value)
        if data.ndim == len(out_axes) + 1:  # a channel axis, after time
            channel = 1 if "T" in out_axes else 0
            if data.shape[channel] == 1:
                data = np.take(data, 0, axis=channel)
            else:
                meta["channel_axis"] = channel
                meta["name"] = [f"{source} {name} {c}{by}" for c in range(data.shape[channel])]
        meta.update(place)
        if name in ("uncertainty", "signal_uncertainty", "tta_spread", "confidence"):
            meta["colormap"] = "magma"
        layers.append((data, meta, "image"))
    return layers


# -- layers as a training data set -----------------------------------------------------------------
#: The data config for each kind of target a task trains on.
DATA_FOR_TARGET = {"mask": ("tiff_folder", "masks"), "image": ("tiff_pairs", "targets"), "optional_image": ("tiff_images", None)}


def training_axes(shape: Sequence[int], task_dims: Sequence[int], rgb: bool = False, name: str = "the layer") -> str:
    """The axes of an image layer to train a task on (``task_dims``: the spatial dimensions the
    task takes): a 3D layer is a volume for a task that takes volumes, else a stack of 2D frames;
    4D and more must be said (the axes field)."""
    ndim = len(shape)
    if rgb:
        if ndim != 3 or 2 not in task_dims:
            raise DataError(f"{name}: an RGB layer of shape {tuple(shape)} for a task of {'/'.join(map(str, task_dims))}D data")
        return "YXC"
    if ndim == 2:
        if 2 not in task_dims:
            raise DataError(f"{name}: a 2D layer of shape {tuple(shape)} for a task of 3D data (volumes)")
        return "YX"
    if ndim == 3:
        return "ZYX" if 3 in task_dims else "TYX"
    raise DataError(f"{name}: a {ndim}D layer of shape {tuple(shape)}: give its axes (e.g. TZYX or CZYX) in the axes field")


@dataclass
class TrainingData:
    """What to train on: image arrays and their targets (masks, clean images or nothing), by name,
    with the images' axes (the targets have the same, without a channel axis for masks) and
    pixel sizes in micrometres (Z, Y, X; None: unknown)."""

    images: dict[str, np.ndarray]
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    axes: str | None = None
    pixel_size: list[float] | None = None

    def check(self, target_kind: str) -> None:
        if not self.images:
            raise DataError("training: choose at least one image layer")
        folder = DATA_FOR_TARGET.get(target_kind, (None, "masks"))[1]
        for name, image in self.images.items():
            if self.axes is not None and len(self.axes) != image.ndim:
                raise DataError(f"training: axes {self.axes} for the image {name} of shape {image.shape}")
            if folder is None:
                continue
            what = "labels layer" if folder == "masks" else "target image layer"
            target = self.targets.get(name)
            if target is None:
                raise DataError(f"training: {name} has no {what} (this task learns from pairs)")
            expected = {tuple(image.shape)}
            if folder == "masks":  # a mask has no channel axis
                expected.add(tuple(n for n, a in zip(image.shape, self.axes) if a != "C") if self.axes
                             else tuple(image.shape[1:]))
            if tuple(target.shape) not in expected:
                raise DataError(f"training: the {what} of shape {target.shape} does not match the image {name} "
                                f"of shape {image.shape}")
            if folder == "masks" and not np.any(target):
                raise DataError(f"training: the {what} for {name} has no labelled object")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "layer"


def write_training_data(data: TrainingData, target_kind: str, project_dir: str | Path) -> tuple[Path, list[str]]:
    """Write the layers as TIFF files under ``<project_dir>/napari-data/<time>/`` (kept: the run
    records them as its data) and return the folder and the data overrides that train on them."""
    import tifffile

    data.check(target_kind)
    config, target_folder = DATA_FOR_TARGET.get(target_kind, ("tiff_folder", "masks"))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    folder = Path(project_dir).expanduser().resolve() / "napari-data" / stamp
    (folder / "images").mkdir(parents=True)
    for name, image in data.images.items():
        tifffile.imwrite(folder / "images" / f"{safe_name(name)}.tif", image)
        if target_folder is not None:
            (folder / target_folder).mkdir(exist_ok=True)
            target = data.targets[name]
            if target_folder == "masks":
                target = target.astype(np.uint16 if target.max() < 65536 else np.uint32)
            tifffile.imwrite(folder / target_folder / f"{safe_name(name)}.tif", target)
    overrides = [f"data={config}", f"data.source.images={folder / 'images'}"]
    if target_folder is not None:
        overrides.append(f"data.source.{target_folder}={folder / target_folder}")
    if data.axes:
        overrides.append(f"data.source.axes={data.axes}")
        if target_folder is not None:  # the targets' axes: the image's (a mask's without channels)
            target_axes = data.axes.replace("C", "") if target_folder == "masks" else data.axes
            overrides.append(f"data.source.{'mask_axes' if target_folder == 'masks' else 'target_axes'}={target_axes}")
    if data.pixel_size:
        overrides.append(f"data.source.pixel_size=[{','.join(f'{v:g}' for v in data.pixel_size)}]")
    # few images: hold out regions of each image rather than whole images
    overrides.append("data.split.by=auto")
    return folder, overrides


def layer_pixel_size(layer, axes: str) -> list[float] | None:
    """A layer's pixel size in micrometres along its spatial axes (Z, Y, X), when its units are
    lengths; None when they are napari's default pixels (then the size is unknown)."""
    units = getattr(layer, "units", None)
    scale = list(getattr(layer, "scale", []))
    layer_axes = axes.replace("C", "") if getattr(layer, "rgb", False) else axes
    if units is None or len(units) != len(layer_axes) or len(scale) != len(layer_axes):
        return None
    sizes = []
    for axis, unit, value in zip(layer_axes, units, scale):
        if axis not in "ZYX":
            continue
        try:
            sizes.append(float((value * unit).to("micrometer").magnitude))
        except Exception:  # pixels, or no length at all
            return None
    return sizes or None
