"""Tiled prediction for a model: tile size and overlap from its network and the device's memory.

:class:`TiledPredictor` is what every task shares to predict images of any size; a task provides
``self.model`` (its network), ``self.context`` (:class:`bioflow.tasks.context.TaskContext`: its
``predict``, ``normalize`` and ``channels``), ``self.data_info``,
``self.device``, and, where they differ from the defaults, :meth:`output_stride`,
:meth:`tta_channel_map` and :meth:`normalizer`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from bioflow.errors import ConfigError
from bioflow.inference.outputs import OutputSpec, PredictionSession
from bioflow.inference.tiling import (
    TilePlan, array_reader, minimum_overlap, padded_size, predict_tiled, stream_predict,
)

log = logging.getLogger(__name__)


@runtime_checkable
class Predictor(Protocol):
    """What ``bioflow predict``, ``bioflow.Model`` and the contract kit ask of a model: every task
    (through :class:`TiledPredictor`) and a bioimage.io package of another tool
    (:class:`bioflow.bioimageio.runtime.PackageModel`) implement it.

    ``data_info`` has ``in_channels``, ``spatial_dims`` and ``pixel_size`` (what inputs are checked
    against); ``predict_array`` streams the outputs of a raw channel-first image strip by strip
    into ``sink(start, block)``, tiled with the tiler's options
    (:data:`bioflow.inference.options.TILING`); the session turns those strips into the output
    images that ``prediction_outputs`` names.
    """

    data_info: Any

    def prediction_outputs(self) -> list[OutputSpec]: ...

    def prediction_session(self, shape: Sequence[int], workdir: Any = None) -> PredictionSession: ...

    def prediction_caveats(self) -> list[str]: ...

    def predict_array(self, image: Any, sink: Callable[[int, torch.Tensor], None], tile_size: Sequence[int] | None = None,
                      overlap: Sequence[int] | None = None, batch_size: int | None = None, tta: bool = False,
                      blend: str = "cosine", progress: bool = False, tta_spread: bool = False) -> None: ...

    def to(self, device: Any) -> Any: ...


class TiledPredictor:
    """Receptive field, tiling and whole-image prediction of a task's network (a mixin)."""

    _receptive_field: int | None = None
    _auto_tile: list[int] | None = None
    _warned_overlap = False

    @property
    def size_multiple(self) -> int:
        """Input sizes the network needs to be multiples of (its poolings)."""
        return int(getattr(self.model, "size_multiple", 1))

    def receptive_field(self) -> int:
        """The network's receptive field in pixels: from the architecture when it says, else probed."""
        if self._receptive_field is None:
            if hasattr(self.model, "receptive_field"):
                self._receptive_field = int(self.model.receptive_field())
            else:
                from bioflow.inference.receptive_field import probe_receptive_field

                self._receptive_field = probe_receptive_field(
                    self.model, self.data_info.in_channels, self.data_info.spatial_dims, self.size_multiple
                )
        return self._receptive_field

    def output_stride(self) -> tuple[int, ...] | None:
        """How much coarser than the input the network's output grid is (None: the same)."""
        return None

    def tta_channel_map(self):
        """How output channels change under flips and quarter turns (None: they do not)."""
        return None

    def spread_quantity(self, raw: torch.Tensor) -> torch.Tensor:
        """What ``--tta-spread`` measures the disagreement of, from a batch of raw outputs
        ``(B, K, ...)``: by default the raw output itself; tasks choose what their outputs mean
        (class probabilities, object probability, the restored intensity)."""
        return raw

    @property
    def channel_selection(self) -> list | None:
        """The channels of the input files the model uses (``data.channels``; None: all)."""
        return self.context.channels

    def normalizer(self):
        """How this model normalises images (as stored with it)."""
        from bioflow.data.normalize import Normalizer

        return Normalizer.from_dict(self.data_info.normalization, self.context.normalize)

    def prediction_outputs(self) -> list[OutputSpec]:
        """The images ``bioflow predict`` writes per input (the first is the main result)."""
        raise NotImplementedError

    def prediction_session(self, shape: Sequence[int], workdir: Any = None) -> PredictionSession:
        """What turns strips of raw output of one image of ``shape`` into the outputs."""
        raise NotImplementedError

    def tiling(
        self, tile_size: Sequence[int] | None = None, overlap: Sequence[int] | None = None, batch_size: int | None = None
    ) -> tuple[list[int], list[int], int]:
        """Tile size, overlap and tiles per batch: given values, else the config's, else automatic.

        The automatic tile fits the free memory of the model's device; the automatic overlap is
        the receptive field (rounded up to even), which makes tiled prediction exact. A smaller
        overlap is allowed with a warning.
        """
        dims = self.data_info.spatial_dims
        cfg = self.context.predict
        on_gpu = str(self.device).startswith("cuda")
        batch = int(batch_size or cfg["batch_size"] or (4 if on_gpu else 1))
        tile = tile_size or cfg["tile_size"]
        if tile is None:
            if self._auto_tile is None:
                self._auto_tile = auto_tile_size(self, str(self.device), batch)
            tile = self._auto_tile
        tile = per_axis(tile, dims, "tile size")
        needed = minimum_overlap(self.receptive_field())
        chosen = overlap or cfg["overlap"]
        chosen = [needed] * dims if chosen is None else per_axis(chosen, dims, "overlap")
        if min(chosen) < needed and not self._warned_overlap:
            self._warned_overlap = True
            log.warning(
                "tile overlap %s is below the network's receptive field (%d pixels, overlap %d needed): "
                "tiled predictions will differ slightly from whole-image ones", chosen, self.receptive_field(), needed,
            )
        return tile, chosen, batch

    def predict_image(self, image: torch.Tensor) -> torch.Tensor:
        """Raw network output for one normalised channel-first image tensor (tiled, blended).

        Inside a :class:`bioflow.inference.fit.FitObserver` that expects this image (evaluation:
        the image of the batch, not a masked or otherwise changed copy), its tiles and activations
        also describe how the image fits the training data."""
        tile, overlap, batch = self.tiling()
        observer = getattr(self, "_fit_observer", None)
        return predict_tiled(self, image, tile, overlap, self.receptive_field(), self.size_multiple,
                             batch_size=batch, stride=self.output_stride(),
                             watch=None if observer is None else observer.watch_if_expected(image))

    def predict_array(
        self,
        image: Any,
        sink: Callable[[int, torch.Tensor], None],
        tile_size: Sequence[int] | None = None,
        overlap: Sequence[int] | None = None,
        batch_size: int | None = None,
        tta: bool = False,
        blend: str = "cosine",
        progress: bool = False,
        norm: Any = None,
        tta_spread: bool = False,
    ) -> None:
        """Predict a raw channel-first image of any size (numpy, memory map or lazy TIFF).

        The image is normalised as in training (:meth:`normalizer`, unless ``norm`` is given),
        read tile by tile, and the raw output is handed to ``sink(start, block)`` strip by strip
        along the first spatial axis. With ``tta_spread`` (which implies ``tta``), each strip has
        one channel more, last: the spread of the augmented predictions of :meth:`spread_quantity`,
        on the output's grid. Inside a :class:`bioflow.inference.fit.FitObserver`, the
        tiles and their activations also describe how the image fits the training data.
        """
        if norm is None:
            norm = self.normalizer().norm_for(image)
        tile, overlap, batch = self.tiling(tile_size, overlap, batch_size)
        shape = tuple(image.shape[1:])
        plan = TilePlan.create(shape, tile, overlap, self.receptive_field(), self.size_multiple, blend)
        read = array_reader(image, self.device, transform=norm)
        observer = getattr(self, "_fit_observer", None)  # a fit check riding along (bioflow.inference.fit)
        if observer is not None:
            read = observer.watch(read, shape)
        stream_predict(
            self, read, shape, plan, sink, batch_size=batch,
            tta=tta or tta_spread, channel_map=self.tta_channel_map(), device=self.device, progress=progress,
            stride=self.output_stride(), spread=self.spread_quantity if tta_spread else None,
        )


def per_axis(values: Sequence[int], dims: int, what: str) -> list[int]:
    """One value per spatial axis from one value or ``dims`` values."""
    values = [int(v) for v in values]
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise ConfigError(f"predict: {what} {values} needs 1 or {dims} values for {dims}D images")
    return values


def auto_tile_size(task, device: str, batch_size: int, fraction: float | None = None) -> list[int]:
    """A tile size whose activations fit in a fraction of the free memory of ``device``.

    The network's memory per pixel is measured once on a small probe tile (the peak of the layer
    outputs alive at once, :func:`activation_peak_bytes`, doubled for the temporaries inside layers
    and the allocator), then scaled to the memory budget: a quarter of the free memory on a GPU,
    half on the CPU, where fewer and larger tiles are faster (less overlap computed twice).
    """
    if fraction is None:
        fraction = 0.25 if device.startswith("cuda") else 0.5
    dims = task.data_info.spatial_dims
    multiple = task.size_multiple
    probe_edge = max(32 if dims == 2 else 16, multiple * 2)
    probe_edge = int(math.ceil(probe_edge / multiple) * multiple)
    probe = torch.zeros((1, task.data_info.in_channels) + (probe_edge,) * dims, device=device)
    per_pixel = max(2.0 * activation_peak_bytes(task.model, probe) / probe_edge**dims, 1.0)
    budget = _free_memory(device) * fraction / max(1, batch_size)
    edge = (budget / per_pixel) ** (1 / dims)
    limit = 2048 if dims == 2 else 256
    edge = int(min(max(edge, 2 * multiple), limit) // multiple * multiple)
    return [max(edge, minimum_tile(task))] * dims


def activation_peak_bytes(model: torch.nn.Module, probe: torch.Tensor) -> int:
    """Peak bytes of the tensors alive at once while ``model`` predicts ``probe`` (no gradients).

    The input and every module's output are counted from their creation until they are freed
    (skip connections of a U-Net stay alive until the decoder has used them); outputs that share
    storage (in-place activations, views) count once.
    """
    import weakref

    live = {probe.untyped_storage().data_ptr(): probe.untyped_storage().nbytes()}
    state = {"now": sum(live.values()), "peak": sum(live.values())}

    def release(pointer: int) -> None:
        state["now"] -= live.pop(pointer, 0)

    def count(_module, _inputs, output) -> None:
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in live:
                continue
            live[pointer] = storage.nbytes()
            state["now"] += live[pointer]
            state["peak"] = max(state["peak"], state["now"])
            weakref.finalize(tensor, release, pointer)

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            result = model(probe)
    finally:
        for h in hooks:
            h.remove()
    del result
    return int(state["peak"])


def minimum_tile(task) -> int:
    """The smallest tile that holds twice the overlap the receptive field needs."""
    return padded_size(2 * minimum_overlap(task.receptive_field()), task.size_multiple)


def _free_memory(device: str) -> float:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 4.0 * 2**30
