"""Predicting with bioimage.io model packages (spec v0.5, or 0.4 converted): bioflow's tiled prediction.

Packages that bioflow wrote (their ``config.bioflow`` names the task and holds its training config)
are rebuilt as their task, the network replaced by the package's weights
(:func:`packaged_task`): they predict, evaluate and post-process exactly as the checkpoint they
came from did, through the task's own normalisation, tiling, prediction session and outputs, for
any task that is installed, built-in or from a plugin.

Every other package (or one whose task is not installed) runs through bioimage.io's runtime
(``bioimageio.core``) as :class:`PackageModel`: its weights through core's model adapters, its pre-
and post-processing through core's operators, with the statistics they need computed by core on
the whole image; bioflow reads the image tile by tile, tiles overlapping by the package's halo and
blended, and writes each output tensor as an image. Borders follow the package's producer:
bioimageio.core pads an image by the halo (with the package's padding mode, ``symmetric`` by
default) before predicting and crops the halo afterwards, and so does bioflow.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from bioflow.bioimageio.package import (  # noqa: F401 (is_package, require_core: this module's interface too)
    PER_IMAGE_SCALE, PER_IMAGE_UNITS, OutputInfo, PackageError, TensorAxes, axis_of, bioflow_section, create_adapter, is_package,
    open_package, require_core,
)
from bioflow.errors import RegistryError

log = logging.getLogger(__name__)

#: Default tile edge for packages (their memory per pixel is unknown): 2D and 3D.
_DEFAULT_TILE = {2: 384, 3: 64}
_MICROMETRES = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "angstrom": 1e-4, "meter": 1e6}


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
            axis = axis_of(self.input, a)
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
            size = axis_of(t, a).size
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
                r = float(axis_of(t, a).scale) / float(axis_of(self.input, a).scale)
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
                h = getattr(axis_of(t, a), "halo", 0) or 0
                halo[i] = max(halo[i], int(h) * self.stride[i])
        return halo

    def _sizes(self) -> tuple[int, Callable[[int, int], int]]:
        """The tiling multiple and ``valid(axis, n)``: the smallest valid input size >= n."""
        from bioimageio.spec.model.v0_5 import ParameterizedSize

        steps, rules = [], []
        for a in self.in_axes.spatial:
            size = axis_of(self.input, a).size
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
        return []

    def prediction_outputs(self):
        """One output image per output tensor, named by its id."""
        from bioflow.inference.outputs import OutputSpec

        return [OutputSpec(o.id, o.channels, o.dtype if o.dtype.kind in "uif" else np.float32) for o in self.outputs]

    def prediction_session(self, shape: Sequence[int], workdir: Any = None):
        from bioflow.inference.outputs import PredictionSession

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

    def predict_array(self, image, sink, tile_size=None, overlap=None, batch_size=None, tta: bool = False,
                      blend: str = "cosine", progress: bool = False, tta_spread: bool = False) -> None:
        """Predict a raw channel-first image of any size; hand strips of the outputs (post-processed,
        channels of all outputs in a row) to ``sink(start, block)``. With ``tta_spread``, one
        channel more, last: the spread of the augmented predictions of all output channels (in the
        units of the outputs; where outputs are mapped back to the input's intensities, scaled by
        the mean such scale)."""
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
        finish = self._to_units(stat)

        def cropped(start: int, block) -> None:  # drop the halo the image was padded with
            lo, hi = max(start, out_halo[0]), min(start + block.shape[1], out_halo[0] + out_shape[0])
            if hi <= lo:
                return
            box = (slice(None), slice(lo - start, hi - start)) + tuple(
                slice(h, h + n) for h, n in zip(out_halo[1:], out_shape[1:]))
            part = block[box]
            if not tta_spread:
                sink(lo - out_halo[0], finish(part) if finish else part)
                return
            outputs, spread = part[:-1], part[-1:]
            if finish:
                spread = spread * (finish(torch.ones_like(outputs)) - finish(torch.zeros_like(outputs))).mean(dim=0, keepdim=True)
                outputs = finish(outputs)
            sink(lo - out_halo[0], torch.cat([outputs, spread]))

        with torch.no_grad():
            stream_predict(self._forward(post, stat), read, padded, plan, cropped, batch_size=int(batch_size or 2),
                           tta=tta or tta_spread, channel_map=None, device="cpu", progress=progress, stride=self.stride,
                           spread=(lambda y: y) if tta_spread else None)

    # -- machinery ----------------------------------------------------------------------------------
    def adapter(self):
        if self._adapter is None:
            self._adapter = create_adapter(self.descr, self.device, self.origin)
        return self._adapter

    def _processing(self, image):
        """Pre- and post-processing operators, and the statistics they need: of the whole image,
        padded by the halo for packages of other tools, as bioimageio.core's ``predict`` takes them."""
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
            if self.bioflow is None and any(self.halo):
                # as bioimageio.core's predict does: statistics of the image padded by the halo
                # (as _reader pads it), not of the image alone
                from bioimageio.spec.model.v0_5 import SymmetricPadding

                sample = sample.pad({self.input.id: dict(zip(self.in_axes.spatial, self.halo))},
                                    mode={self.input.id: self.input.pad or SymmetricPadding()})
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

    def _forward(self, post, stat, fit: bool = True):
        """The network (through core's adapter) plus post-processing, on batches in bioflow's layout;
        ``fit``: pad tiles to a size the description declares valid (else as they come)."""
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
            x, crop = self._fit(x) if fit else (x, (slice(None),) * (x.ndim - 2))
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
        """For outputs that bioflow's exporter lists under ``config.bioflow.per_image_units``: back
        to the input's intensities with the input's own percentiles (the inverse of core's
        ``scale_range``), which the format's post-processing cannot refer to. None: nothing to do."""
        import torch

        wanted = set((self.bioflow or {}).get(PER_IMAGE_UNITS) or ())
        spreads = set((self.bioflow or {}).get(PER_IMAGE_SCALE) or ())
        quantiles = sorted((m for m in stat if getattr(m, "q", None) is not None and str(m.member_id) == self.input_id),
                           key=lambda m: m.q)
        if not (wanted or spreads) or len(quantiles) < 2:
            return None
        low, high = (np.asarray(stat[m].data, dtype=np.float64).reshape(-1) for m in (quantiles[0], quantiles[-1]))
        scale = torch.from_numpy((high - low + 1e-6).astype(np.float32))
        offset = torch.from_numpy(low.astype(np.float32))
        bounds = np.cumsum([0] + [o.channels or 1 for o in self.outputs])
        ranges = [(int(bounds[i]), int(bounds[i + 1]), o.id in wanted) for i, o in enumerate(self.outputs)
                  if o.id in wanted or o.id in spreads]

        def to_units(block):
            block = block.clone()
            for a, b, with_offset in ranges:
                shape = (-1,) + (1,) * (block.ndim - 1)
                block[a:b] = block[a:b] * scale.reshape(shape).to(block) + (offset.reshape(shape).to(block) if with_offset else 0)
            return block

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



# -- packages bioflow wrote, as their task ------------------------------------------------------------------
def packaged_task(descr, origin: str, *, required: bool = False, inference: bool = True):
    """The bioflow task a package written by ``bioflow export`` came from, its network replaced by
    the package's weights (run by bioimageio.core without the package's pre- and post-processing:
    the task normalises, tiles and post-processes as it does for its checkpoint).

    None when the package has no ``config.bioflow`` or (unless ``required``) when its task is not
    installed here; with ``required`` the latter is a one-line error naming what to install.
    ``inference``: only what prediction needs is built (evaluation needs the loss too).
    """
    from bioflow.registry import registry
    from bioflow.tasks import create_task, with_legacy_settings
    from bioflow.tasks.base import without_network

    section = bioflow_section(descr)
    if section is None:
        if required:
            raise PackageError(f"{origin}: this needs the training config that packages written by `bioflow export` "
                               "keep in config.bioflow; this package has none")
        return None
    name = section["config"]["task"]["name"]
    try:
        registry.resolve("tasks", name)
    except RegistryError as exc:
        component = (section.get("components") or {}).get("task") or {}
        hint = f"; install it with: pip install '{component['distribution']}'" if component.get("distribution") else ""
        if required:
            raise PackageError(f"{origin}: its task '{name}' is not installed ({exc.one_line()}){hint}") from None
        log.warning("%s: its task '%s' is not installed here%s; predicting the package's output tensors as they are",
                    origin, name, hint)
        return None
    config = with_legacy_settings(copy.deepcopy(section["config"]))
    dims = int(section["data_info"]["spatial_dims"])
    # The network's memory per pixel is unknown (it runs outside torch's view): a fixed tile.
    config["predict"] = {**config["predict"], "tile_size": config["predict"].get("tile_size") or [_DEFAULT_TILE[dims]]}
    with without_network():
        task = create_task(config, section["data_info"], inference=inference)
    task.model = PackageNetwork(descr, origin, int(section["receptive_field"]), int(section["size_multiple"]))
    # the whole config section: its extras (bioflow's record) and the fields the spec declares
    # (``stardist``, ``bioimageio``), as plain data
    task.load_package_config(descr.config.model_dump(mode="json", exclude_none=True))
    return task.eval()


def load_package(model: str):
    """The package at ``model`` as a predictor: its bioflow task when bioflow wrote it (and the task
    is installed), else the package's own tensors (:class:`PackageModel`)."""
    descr = open_package(model)
    return packaged_task(descr, model) or PackageModel(descr, model)


def package_checkpoint(descr) -> dict[str, Any]:
    """What a checkpoint records of a model (config, data info, bioflow's record), from a package
    bioflow wrote."""
    section = bioflow_section(descr) or {}
    return {"hyper_parameters": {"config": section.get("config"), "data_info": section.get("data_info")},
            "bioflow": section}


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
            # Tiles come in multiples of the network's size multiple, which it takes as they are
            # (as the checkpoint's network does), even below the package's declared minimum.
            out = self.package._forward([], {}, fit=False)(x.float())
            return out.to(x.device)

    return _PackageNetwork
