"""Running bioimage.io model packages (spec v0.5, or 0.4 converted) with bioflow's tiled prediction.

A package, written by bioflow or by any other tool, is run through bioimage.io's own runtime
(``bioimageio.core``): its weights through core's model adapters, its pre- and post-processing
through core's operators, with the statistics they need (percentiles, mean, ...) computed by core on
the whole image. bioflow supplies the rest of ``bioflow predict``: images of any size read tile by
tile, tiles overlapping by the package's halo and blended, outputs written strip by strip into
TIFF files.

Borders follow the package's producer: bioimageio.core pads an image by the halo (with the
package's padding mode, ``symmetric`` by default) before predicting and crops the halo afterwards,
and so does bioflow for packages of other tools, which makes its result equal core's. Packages that
bioflow wrote (``config.bioflow``) are predicted as their checkpoint is, with the network's own
zero padding at the image border, and turned into the same outputs: class maps, StarDist label
images (non-maximum suppression with the thresholds in ``config.stardist``), restored images in the
input's units.

:class:`PackageModel` offers what ``bioflow predict`` asks of a task; :func:`evaluation_model`
rebuilds a bioflow task around a package's weights for ``bioflow evaluate``.
"""

from __future__ import annotations

import functools
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bioflow.errors import BioflowError

YAML_NAMES = ("rdf.yaml", "bioimageio.yaml")
#: Weight formats tried, in this order, among those present and runnable here.
WEIGHT_PRIORITY = ("pytorch_state_dict", "torchscript", "onnx", "tensorflow_saved_model_bundle", "keras_v3", "keras_hdf5")
_BACKENDS = {"pytorch_state_dict": "torch", "torchscript": "torch", "onnx": "onnxruntime",
             "tensorflow_saved_model_bundle": "tensorflow", "keras_hdf5": "tensorflow", "keras_v3": "keras"}
#: Default tile edge for packages (their memory per pixel is unknown): 2D and 3D.
_DEFAULT_TILE = {2: 384, 3: 64}
_MICROMETRES = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "angstrom": 1e-4, "meter": 1e6}


class PackageError(BioflowError):
    """A bioimage.io package cannot be read or run."""


def is_package(model: str) -> bool:
    """Whether ``model`` names a bioimage.io package (a .zip, an rdf.yaml, or a folder with one)."""
    path = Path(model)
    if path.is_dir():
        return any((path / name).is_file() for name in YAML_NAMES)
    return path.suffix.lower() in (".zip", ".yaml", ".yml")


def require_core() -> None:
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError as exc:
        raise PackageError(
            f"bioimage.io packages need the optional extra ({exc.name or exc} is not installed): "
            "pip install 'bioflow[bioimageio]'"
        ) from None


def first_error(summary) -> str:
    """The first error of a bioimage.io validation summary, as one line."""
    for detail in summary.details:
        for error in detail.errors:
            loc = ".".join(str(p) for p in error.loc)
            msg = " ".join(str(error.msg).split())
            return f"{loc}: {msg}" if loc else msg
    return f"validation status {summary.status}"


def open_package(model: str):
    """The v0.5 model description of a package file or folder; a one-line error if it is none."""
    require_core()
    path = Path(model)
    if not path.exists():
        raise PackageError(f"{path}: no such file or folder")
    source: Any = path
    if path.is_file() and path.suffix.lower() == ".zip":
        if not zipfile.is_zipfile(path):
            raise PackageError(f"{path}: not a readable zip file (corrupt or truncated?)")
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError) as exc:
            raise PackageError(f"{path}: not a readable zip file ({exc})") from None
        if not names & set(YAML_NAMES):
            hint = "; it looks like a bioflow checkpoint: name it .ckpt" if any(n.endswith("data.pkl") for n in names) else ""
            raise PackageError(f"{path}: not a bioimage.io package (no rdf.yaml or bioimageio.yaml inside){hint}")
    elif path.is_dir():
        source = next(path / n for n in YAML_NAMES if (path / n).is_file())
    from bioimageio.spec import load_description
    from bioimageio.spec.model.v0_5 import ModelDescr

    try:
        descr = load_description(source, format_version="latest", perform_io_checks=False)
    except Exception as exc:
        raise PackageError(f"{path}: not a readable bioimage.io description ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]})") from None
    kind = getattr(descr, "type", None)
    if kind is not None and kind != "model":
        raise PackageError(f"{path}: a bioimage.io {kind}, not a model")
    if not isinstance(descr, ModelDescr):
        raise PackageError(f"{path}: not a valid bioimage.io model ({first_error(descr.validation_summary)})")
    return descr


def bioflow_section(descr) -> dict[str, Any] | None:
    """``config.bioflow`` of a package bioflow wrote, else None."""
    extra = descr.config.model_extra or {}
    section = extra.get("bioflow")
    return section if isinstance(section, dict) and "config" in section else None


def runnable_formats(descr) -> list[str]:
    """Weight formats of the package that can run here, in priority order."""
    import importlib.util

    present = [f for f in WEIGHT_PRIORITY if getattr(descr.weights, f, None) is not None]
    runnable = [f for f in present if importlib.util.find_spec(_BACKENDS[f]) is not None]
    if not runnable:
        missing = sorted({_BACKENDS[f] for f in present})
        raise PackageError(
            f"{descr.name}: its weights ({', '.join(present)}) cannot run here: install {' or '.join(missing)}"
        )
    return runnable


def create_adapter(descr, device: str, origin: str):
    """bioimageio.core's model adapter for the first weight format that loads."""
    from bioimageio.core.backends import create_model_adapter

    formats = runnable_formats(descr)
    try:
        return create_model_adapter(descr, devices=[device], weight_format_priority_order=formats)
    except Exception as exc:
        raise PackageError(f"{origin}: none of its weights ({', '.join(formats)}) could be loaded "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:240]})") from None


# -- tensors and axes ----------------------------------------------------------------------------------
@dataclass
class TensorAxes:
    """A package tensor's axes: their ids in order, each one's name in bioflow's layout ("batch",
    "channel" or the space axis id), and the space axes in bioflow's (Z, Y, X) order."""

    ids: list[str]
    names: list[str]
    spatial: list[str]

    @classmethod
    def of(cls, descr, origin: str) -> "TensorAxes":
        ids, names, spatial = [], [], []
        for a in descr.axes:
            if a.type in ("batch", "channel"):
                names.append(a.type)
            elif a.type == "space":
                names.append(str(a.id))
                spatial.append(str(a.id))
            else:
                raise PackageError(f"{origin}: tensor '{descr.id}' has a {a.type} axis '{a.id}'; bioflow runs images with "
                                   "batch, channel and space axes only")
            ids.append(str(a.id))
        if len(spatial) not in (2, 3):
            raise PackageError(f"{origin}: tensor '{descr.id}' has {len(spatial)} space axes; bioflow runs 2D and 3D images")
        if set(spatial) <= set("zyx"):
            spatial = sorted(spatial, key="zyx".index)
        return cls(ids, names, spatial)

    @property
    def has_batch(self) -> bool:
        return "batch" in self.names

    @property
    def layout(self) -> list[str]:
        """bioflow's layout of a batch: batch, channel, spatial axes."""
        return ["batch", "channel", *self.spatial]

    def to_package(self, array: np.ndarray) -> np.ndarray:
        """``(N, C, *spatial)`` in bioflow's layout to this tensor's axis order (N, C dropped if absent)."""
        missing = tuple(i for i, name in enumerate(self.layout) if name not in self.names)
        kept = [name for name in self.layout if name in self.names]
        return np.transpose(array.squeeze(missing) if missing else array, [kept.index(n) for n in self.names])

    def from_package(self, array: np.ndarray) -> np.ndarray:
        """This tensor's axis order to ``(N, C, *spatial)`` (singleton N, C where absent)."""
        order = list(self.names)
        for name in ("channel", "batch"):
            if name not in order:
                array, order = array[None], [name, *order]
        return np.transpose(array, [order.index(n) for n in self.layout])


def _axis(descr, axis_id: str):
    return next(a for a in descr.axes if str(a.id) == axis_id)


@dataclass
class OutputInfo:
    id: str
    axes: TensorAxes
    channels: int | None  # None: no channel axis
    dtype: Any


# -- the package as a predictor ------------------------------------------------------------------------
@dataclass
class PackageDataInfo:
    """What ``bioflow predict`` checks an image against (the same names as a task's data info)."""

    in_channels: int
    spatial_dims: int
    pixel_size: list[float] | None


class PackageModel:
    """A bioimage.io package with the prediction interface of a bioflow task (see ``bioflow.prediction``)."""

    def __init__(self, descr, origin: str) -> None:
        self.descr = descr
        self.origin = origin
        self.device = "cpu"
        self._adapter = None
        inputs = [t for t in descr.inputs if not t.optional]
        if len(inputs) != 1:
            raise PackageError(f"{origin}: the model takes {len(inputs)} input tensors; bioflow runs models with one input")
        self.input = inputs[0]
        self.input_id = str(self.input.id)
        self.in_axes = TensorAxes.of(self.input, origin)
        self.bioflow = bioflow_section(descr)
        channel = next((a for a in self.input.axes if a.type == "channel"), None)
        in_channels = len(channel.channel_names) if channel is not None else 1
        self.data_info = PackageDataInfo(in_channels, len(self.in_axes.spatial), self._pixel_size())
        self.outputs = [self._output(t) for t in descr.outputs]
        self.stride = self._stride()
        self.halo = self._input_halo()
        self.multiple, self.valid = self._sizes()
        self._check_processing()

    # -- description ------------------------------------------------------------------------------
    def _pixel_size(self) -> list[float] | None:
        if self.bioflow is not None:
            return self.bioflow["data_info"].get("pixel_size")
        sizes = []
        for a in self.in_axes.spatial:
            axis = _axis(self.input, a)
            unit = str(axis.unit) if axis.unit is not None else None
            if unit not in _MICROMETRES:
                return None
            sizes.append(float(axis.scale) * _MICROMETRES[unit])
        return sizes

    def _output(self, t) -> OutputInfo:
        from bioimageio.spec.model.v0_5 import SizeReference

        axes = TensorAxes.of(t, self.origin)
        if axes.spatial != self.in_axes.spatial:
            raise PackageError(f"{self.origin}: output '{t.id}' has space axes {axes.spatial}, the input {self.in_axes.spatial}")
        for a in axes.spatial:
            size = _axis(t, a).size
            if not isinstance(size, SizeReference) or str(size.tensor_id) != self.input_id or str(size.axis_id) != a:
                raise PackageError(f"{self.origin}: the size of output '{t.id}' along '{a}' does not follow the input's, "
                                   "so the output cannot be predicted tile by tile")
            if size.offset:
                raise PackageError(f"{self.origin}: output '{t.id}' is {size.offset:+d} pixels larger than the input along '{a}'; "
                                   "bioflow tiles outputs of the input's size (or a fraction of it) only")
        channel = next((a for a in t.axes if a.type == "channel"), None)
        channels = None if channel is None else len(channel.channel_names)
        return OutputInfo(str(t.id), axes, channels, np.dtype(str(t.dtype)))

    def _stride(self) -> tuple[int, ...]:
        strides = set()
        for t in self.descr.outputs:
            ratios = []
            for a in self.in_axes.spatial:
                r = float(_axis(t, a).scale) / float(_axis(self.input, a).scale)
                if abs(r - round(r)) > 1e-6 or round(r) < 1:
                    raise PackageError(f"{self.origin}: output '{t.id}' has {r:g} input pixels per output pixel along '{a}'; "
                                       "bioflow tiles outputs subsampled by whole numbers only")
                ratios.append(int(round(r)))
            strides.add(tuple(ratios))
        if len(strides) != 1:
            raise PackageError(f"{self.origin}: its outputs have different resolutions; bioflow needs them on one grid")
        return strides.pop()

    def _input_halo(self) -> list[int]:
        """Per spatial axis, the input pixels each side that an output pixel needs (from the outputs' halos)."""
        halo = [0] * len(self.in_axes.spatial)
        for t in self.descr.outputs:
            for i, a in enumerate(self.in_axes.spatial):
                h = getattr(_axis(t, a), "halo", 0) or 0
                halo[i] = max(halo[i], int(h) * self.stride[i])
        return halo

    def _sizes(self) -> tuple[int, Callable[[int, int], int]]:
        """The tiling multiple and ``valid(axis, n)``: the smallest valid input size >= n."""
        from bioimageio.spec.model.v0_5 import ParameterizedSize

        steps, rules = [], []
        for a in self.in_axes.spatial:
            size = _axis(self.input, a).size
            if isinstance(size, ParameterizedSize):
                rules.append((size.min, size.step))
                steps.append(size.step if size.min % size.step == 0 else 1)
            elif isinstance(size, int):
                rules.append((size, 0))
            else:
                raise PackageError(f"{self.origin}: the input size along '{a}' refers to another axis; bioflow cannot tile it")
        multiple = math.lcm(*steps, *self.stride) if steps else math.lcm(*self.stride)

        def valid(axis: int, n: int) -> int:
            low, step = rules[axis]
            if step == 0:
                if n > low:
                    raise PackageError(f"{self.origin}: tiles of {n} pixels along '{self.in_axes.spatial[axis]}' exceed the "
                                       f"model's fixed input size {low}; pass a smaller --tile-size")
                return low
            return low + max(0, -(-(n - low) // step)) * step

        self.fixed = [low if step == 0 else None for low, step in rules]
        return multiple, valid

    def _check_processing(self) -> None:
        from bioimageio.core.proc_setup import get_requried_measures

        required = get_requried_measures(self.descr)
        foreign = sorted({str(m.member_id) for m in (*required.pre, *required.post) if str(m.member_id) != self.input_id})
        if foreign:
            raise PackageError(f"{self.origin}: its processing needs statistics of the tensor(s) {', '.join(foreign)}, "
                               "which tile-by-tile prediction cannot know before the output is complete")

    # -- what bioflow predict asks of a task -------------------------------------------------------
    def to(self, device: str) -> "PackageModel":
        if device != self.device:
            self.device, self._adapter = device, None
        return self

    def prediction_caveats(self) -> list[str]:
        if self.bioflow is None:
            return []
        from bioflow.tasks import get_task

        caveat = getattr(get_task(self.bioflow["task"]), "caveat", "")
        return [caveat] if caveat else []

    def prediction_outputs(self):
        from bioflow.inference.outputs import OutputSpec

        task = self.bioflow["task"] if self.bioflow else None
        if task == "segmentation":
            classes = self.outputs[0].channels or 1
            specs = [OutputSpec("labels", None, np.uint8 if classes <= 256 else np.uint16)]
            if self._segmentation_postprocessor() is not None:
                specs.append(OutputSpec("instances", None, np.int32, streamed=False))
            return specs
        if task == "stardist":
            return [OutputSpec("labels", None, np.int32, streamed=False)]
        if task in ("care", "n2v"):
            return [OutputSpec("restored", self.data_info.in_channels, np.float32)]
        return [OutputSpec(o.id, o.channels, o.dtype if o.dtype.kind in "uif" else np.float32) for o in self.outputs]

    def prediction_session(self, shape: Sequence[int], workdir: Any = None):
        from bioflow.inference.outputs import PredictionSession

        task = self.bioflow["task"] if self.bioflow else None
        if task == "segmentation":
            return _ClassSession(self.prediction_outputs(), self._segmentation_postprocessor(), shape,
                                 self.outputs[0].channels or 1, workdir)
        if task == "stardist":
            from bioflow.tasks.stardist import _StarDistSession

            return _StarDistSession(_StarDistSettings.of(self.descr, self.bioflow), tuple(shape), workdir)
        specs = self.prediction_outputs()
        bounds = np.cumsum([0] + [o.channels or 1 for o in self.outputs])

        def split(raw) -> dict[str, np.ndarray]:
            block = raw.detach().cpu().numpy()
            out = {}
            for i, spec in enumerate(specs):
                part = block[bounds[i]:bounds[i + 1]] if len(specs) > 1 else block
                if spec.channels is None:
                    part = part[0]
                out[spec.name] = _cast(part, spec.dtype)
            return out

        return PredictionSession(specs, split)

    def _segmentation_postprocessor(self):
        from bioflow.config import component
        from bioflow.errors import RegistryError
        from bioflow.registry import registry

        node = self.bioflow["config"].get("postprocessor")
        if not node:
            return None
        name, kwargs = component(node)
        try:
            return registry.create("postprocessors", name, where="postprocessor", **kwargs)
        except RegistryError as exc:
            import logging

            logging.getLogger(__name__).warning("%s: no instance labels: %s", self.origin, exc.one_line())
            return None

    def predict_array(self, image, sink, tile_size=None, overlap=None, batch_size=None, tta: bool = False,
                      blend: str = "cosine", progress: bool = False) -> None:
        """Predict a raw channel-first image of any size; hand strips of the outputs (post-processed,
        channels of all outputs in a row) to ``sink(start, block)``."""
        import torch

        from bioflow.inference.tiling import TilePlan, minimum_overlap, stream_predict

        dims = self.data_info.spatial_dims
        shape = tuple(int(s) for s in image.shape[1:])
        pre, post, stat = self._processing(image)
        halo = [0] * dims if self.bioflow is not None else list(self.halo)
        padded = tuple(s + 2 * h for s, h in zip(shape, halo))
        rf = int(self.bioflow["receptive_field"]) if self.bioflow is not None else 2 * max(self.halo)
        tile = self._tile(tile_size, padded)
        needed = minimum_overlap(rf)
        chosen = [needed] * dims if overlap is None else _per_axis(overlap, dims)
        plan = TilePlan.create(padded, tile, chosen, rf, self.multiple, blend)
        read = self._reader(image, halo, pre, stat, plan.shape)
        out_halo = [h // g for h, g in zip(halo, self.stride)]
        out_shape = [-(-s // g) for s, g in zip(shape, self.stride)]
        finish = self._to_units(stat) if self.bioflow is not None and self.bioflow["task"] in ("care", "n2v") else None

        def cropped(start: int, block) -> None:  # drop the halo the image was padded with
            lo, hi = max(start, out_halo[0]), min(start + block.shape[1], out_halo[0] + out_shape[0])
            if hi <= lo:
                return
            box = (slice(None), slice(lo - start, hi - start)) + tuple(
                slice(h, h + n) for h, n in zip(out_halo[1:], out_shape[1:]))
            part = block[box]
            sink(lo - out_halo[0], finish(part) if finish else part)

        channel_map = None
        if self.bioflow is not None and self.bioflow["task"] == "stardist":
            from bioflow.tasks.stardist import _ray_permutation_map

            channel_map = _ray_permutation_map(int(self.bioflow["config"]["task"].get("n_rays", 32)))
        with torch.no_grad():
            stream_predict(self._forward(post, stat), read, padded, plan, cropped, batch_size=int(batch_size or 2), tta=tta,
                           channel_map=channel_map, device="cpu", progress=progress, stride=self.stride)

    # -- machinery ----------------------------------------------------------------------------------
    def adapter(self):
        if self._adapter is None:
            self._adapter = create_adapter(self.descr, self.device, self.origin)
        return self._adapter

    def _processing(self, image):
        """Pre- and post-processing operators, and the statistics they need (of the whole image)."""
        from bioimageio.core._op_base import BlockwiseOperator
        from bioimageio.core.proc_ops import UpdateStats
        from bioimageio.core.proc_setup import setup_pre_and_postprocessing

        pre, post = setup_pre_and_postprocessing(self.descr, dataset_for_initial_statistics=[])
        updates = [op for op in pre if isinstance(op, UpdateStats)]
        pre = [op for op in pre if not isinstance(op, UpdateStats)]
        for op in (*pre, *post):
            if not isinstance(op, BlockwiseOperator):
                raise PackageError(f"{self.origin}: its {type(op).__name__} processing needs the whole image at once, "
                                   "which bioflow's tiled prediction does not do")
        stat: dict = {}
        if updates:
            sample = self._sample(np.asarray(image, dtype=self._input_dtype())[None], {})
            for op in updates:
                op(sample)
            stat = dict(sample.stat)
        return pre, post, stat

    def _input_dtype(self):
        dtype = np.dtype(str(self.input.dtype))
        return dtype if dtype.kind in "iu" else np.float32

    def _sample(self, batch: np.ndarray, stat):
        from bioimageio.core.sample import Sample
        from bioimageio.core.tensor import Tensor

        member = Tensor.from_numpy(self.in_axes.to_package(batch), dims=self.in_axes.ids)
        return Sample(members={self.input.id: member}, stat=stat, id="image")

    def _reader(self, image, halo: Sequence[int], pre, stat, plan_shape: Sequence[int]):
        """Tiles of the image padded by ``halo`` (the package's padding mode), preprocessed, as tensors."""
        import torch

        from bioflow.inference.tiling import reflect_indices

        mode = getattr(self.input.pad, "mode", None) or "symmetric"
        value = float(getattr(self.input.pad, "value", 0.0) or 0.0)
        sizes = [int(s) for s in image.shape[1:]]
        maps = [np.pad(np.arange(s), (h, h), mode="constant", constant_values=-1) if mode == "constant"
                else np.pad(np.arange(s), (h, h), mode=mode) for s, h in zip(sizes, halo)]
        dtype = self._input_dtype()

        def read(start: Sequence[int], size: Sequence[int]):
            index = [m[reflect_indices(a, a + n, len(m))] for m, a, n in zip(maps, start, size)]
            clipped = [np.clip(i, 0, s - 1) for i, s in zip(index, sizes)]
            box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in clipped)
            part = np.asarray(image[(slice(None),) + box]).astype(dtype, copy=False)
            part = part[(slice(None),) + np.ix_(*[c - c.min() for c in clipped])]
            outside = [i < 0 for i in index]
            if any(o.any() for o in outside):
                mask = np.zeros(tuple(size), bool)
                for axis, o in enumerate(outside):
                    mask |= o.reshape([-1 if k == axis else 1 for k in range(len(size))])
                part = part.copy()
                part[:, mask] = value
            sample = self._sample(part[None], stat)
            for op in pre:
                op(sample)
            data = sample.members[self.input.id].data.transpose(*self.in_axes.ids).values
            return torch.from_numpy(np.ascontiguousarray(self.in_axes.from_package(data)[0], dtype=np.float32))

        return read

    def _forward(self, post, stat):
        """The network (through core's adapter) plus post-processing, on batches in bioflow's layout."""
        import torch

        from bioimageio.core.sample import Sample
        from bioimageio.core.tensor import Tensor

        def run(batch: np.ndarray) -> list[np.ndarray]:
            tensor = Tensor.from_numpy(self.in_axes.to_package(batch), dims=self.in_axes.ids)
            outputs = self.adapter().forward({self.input.id: tensor})
            sample = Sample(members={k: v for k, v in outputs.items() if v is not None}, stat=stat, id="image")
            for op in post:
                op(sample)
            parts = []
            for o in self.outputs:
                data = sample.members[o.id].data.transpose(*o.axes.ids).values
                parts.append(o.axes.from_package(np.asarray(data, dtype=np.float32)))
            return parts

        def fn(batch):
            x = batch.detach().cpu().numpy()
            x, crop = self._fit(x)
            if self.in_axes.has_batch:
                parts = run(x)
            else:
                per_tile = [run(x[i:i + 1]) for i in range(x.shape[0])]
                parts = [np.concatenate(p) for p in zip(*per_tile)]
            out = np.concatenate(parts, axis=1)
            return torch.from_numpy(np.ascontiguousarray(out[(slice(None), slice(None)) + crop]))

        return fn

    def _fit(self, batch: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
        """Pad a batch of tiles to a valid input size (for packages whose sizes are not multiples),
        and the crop of the output back to the tile."""
        sizes = batch.shape[2:]
        targets = [self.valid(i, n) for i, n in enumerate(sizes)]
        crop = tuple(slice(0, n // g) for n, g in zip(sizes, self.stride))
        if list(targets) == list(sizes):
            return batch, crop
        pad = [(0, 0), (0, 0)] + [(0, t - n) for t, n in zip(targets, sizes)]
        return np.pad(batch, pad, mode="symmetric"), crop

    def _tile(self, tile_size, shape: Sequence[int]) -> list[int]:
        dims = len(shape)
        if tile_size is not None:
            tile = _per_axis(tile_size, dims)
        elif self.bioflow is not None and self.bioflow["config"]["predict"].get("tile_size"):
            tile = _per_axis(self.bioflow["config"]["predict"]["tile_size"], dims)
        else:
            tile = [_DEFAULT_TILE[dims]] * dims
        return [f if f is not None else t for t, f in zip(tile, self.fixed)]

    def _to_units(self, stat):
        """For bioflow's restoration packages normalised per image: back to the input's intensities
        with the input's percentiles (the inverse of core's ``scale_range``)."""
        import torch

        quantiles = sorted((m for m in stat if getattr(m, "q", None) is not None and str(m.member_id) == self.input_id),
                           key=lambda m: m.q)
        if len(quantiles) < 2:
            return None
        low, high = (np.asarray(stat[m].data, dtype=np.float64).reshape(-1) for m in (quantiles[0], quantiles[-1]))
        scale = torch.from_numpy((high - low + 1e-6).astype(np.float32))
        offset = torch.from_numpy(low.astype(np.float32))

        def to_units(block):
            shape = (-1,) + (1,) * (block.ndim - 1)
            return block * scale.reshape(shape).to(block) + offset.reshape(shape).to(block)

        return to_units


def _per_axis(values: Sequence[int], dims: int) -> list[int]:
    values = [int(v) for v in values]
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise PackageError(f"{values}: give 1 or {dims} values for {dims}D images")
    return values


def _cast(array: np.ndarray, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(dtype)
    return array.astype(dtype)


class _ClassSession:
    """Class maps (argmax of the package's probabilities), and instances from the model's post-processor."""

    def __init__(self, outputs, postprocessor, shape, classes: int, workdir) -> None:
        from bioflow.inference.outputs import SpooledArray

        self.outputs = list(outputs)
        self.postprocessor = postprocessor
        self.dtype = self.outputs[0].dtype
        self.spool = SpooledArray((classes, *shape), workdir) if postprocessor is not None else None

    def block(self, start: int, raw) -> dict[str, np.ndarray]:
        if self.spool is not None:
            self.spool.write([0, start] + [0] * (raw.ndim - 2), raw.cpu().numpy())
        return {"labels": raw.argmax(dim=0).cpu().numpy().astype(self.dtype)}

    def finish(self) -> dict[str, np.ndarray]:
        if self.spool is None:
            return {}
        return {"instances": np.asarray(self.postprocessor(self.spool.array()), dtype=np.int32)}

    def close(self) -> None:
        if self.spool is not None:
            self.spool.remove()


@dataclass
class _StarDistSettings:
    """What StarDist's prediction session needs of its task, read from a package bioflow wrote."""

    grid: tuple[int, ...]
    thresholds: Any
    task_settings: dict[str, Any]

    @classmethod
    def of(cls, descr, section: Mapping[str, Any]) -> "_StarDistSettings":
        import torch

        stardist = (descr.config.model_extra or {}).get("stardist") or getattr(descr.config, "stardist", None) or {}
        thresholds = stardist.get("thresholds") or {}
        settings = section["config"]["task"]
        grid = stardist.get("config", {}).get("grid") or settings.get("grid", [1, 1])
        prob = float(thresholds.get("prob", settings.get("prob_thresh", 0.5)))
        nms = float(thresholds.get("nms", settings.get("nms_thresh", 0.4)))
        return cls(tuple(int(g) for g in grid), torch.tensor([prob, nms]),
                   {"criterion": settings.get("criterion", "min_area")})

    @staticmethod
    def activate(raw):
        return raw  # the package's post-processing (sigmoid, clip) did it

    def nms(self, shape=None):
        """The registered ``stardist_nms`` post-processor with the package's thresholds, as the task's."""
        from bioflow.registry import registry

        return registry.create("postprocessors", "stardist_nms", where="package", prob_thresh=float(self.thresholds[0]),
                               nms_thresh=float(self.thresholds[1]), criterion=self.task_settings["criterion"],
                               grid=list(self.grid), shape=None if shape is None else list(shape))

    @staticmethod
    def prediction_outputs():
        from bioflow.inference.outputs import OutputSpec

        return [OutputSpec("labels", None, np.int32, streamed=False)]


def load_package(model: str) -> PackageModel:
    """The package at ``model`` as something ``bioflow predict`` runs like a task."""
    return PackageModel(open_package(model), model)


# -- evaluation ------------------------------------------------------------------------------------------
def evaluation_model(model: str):
    """A bioflow task whose network is the package's (run by bioimageio.core), for ``bioflow evaluate``.

    The task, its metrics and its data come from ``config.bioflow`` (packages bioflow wrote); the data
    are read and normalised as in training. Returns a :class:`bioflow.loading.LoadedModel`.
    """
    import torch

    from bioflow.loading import LoadedModel
    from bioflow.tasks import create_task

    descr = open_package(model)
    section = bioflow_section(descr)
    if section is None:
        raise PackageError(f"{model}: evaluation needs the training config that packages written by `bioflow export` "
                           "keep in config.bioflow; this package has none")
    config = dict(section["config"])
    dims = int(section["data_info"]["spatial_dims"])
    # The architecture is not needed (the package's weights replace the network): a small built-in
    # stand-in lets the task be built where the plugin that provided it is not installed.
    config["model"] = {"name": "unet", "depth": 0, "base_channels": 1, "norm": "none"}
    config["predict"] = {**config["predict"], "tile_size": config["predict"].get("tile_size") or [_DEFAULT_TILE[dims]]}
    task = create_task(config, section["data_info"])
    task.model = PackageNetwork(descr, model, int(section["receptive_field"]), int(section["size_multiple"]))
    if config["task"]["name"] == "stardist":
        task.thresholds.copy_(_StarDistSettings.of(descr, section).thresholds)
    task.eval()
    checkpoint = {"hyper_parameters": {"config": config, "data_info": section["data_info"]}, "bioflow": section}
    return LoadedModel(task, checkpoint, None, model)


def PackageNetwork(descr, origin: str, receptive_field: int, size_multiple: int):
    """A ``torch.nn.Module`` that runs the package's weights (through bioimageio.core, without its
    pre- and post-processing) on normalised batches and returns its outputs, channels in a row: the
    raw output of the network bioflow exported."""
    return _network_class()(descr, origin, receptive_field, size_multiple)


@functools.lru_cache(maxsize=None)
def _network_class():
    import torch

    class _PackageNetwork(torch.nn.Module):
        def __init__(self, descr, origin: str, receptive_field: int, size_multiple: int) -> None:
            super().__init__()
            self.package = PackageModel(descr, origin)
            self.size_multiple = size_multiple
            self._receptive_field = receptive_field

        def receptive_field(self) -> int:
            return self._receptive_field

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.package.to("cuda" if x.is_cuda else "cpu")
            out = self.package._forward([], {})(x.float())
            return out.to(x.device)

    return _PackageNetwork
