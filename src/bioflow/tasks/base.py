"""The base task: what every bioflow LightningModule shares.

A task builds its network and loss from the registry, trains on patches, validates and tests on
whole images through tiled prediction, and keeps in its checkpoint everything needed to rebuild it
(component names, their arguments, plugin versions, the data's channels and pixel size, the split).
Subclasses say how targets are prepared, how outputs become predictions, and which metrics count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torchmetrics import MeanMetric

from bioflow import __version__
from bioflow.config import component
from bioflow.errors import ConfigError
from bioflow.inference.outputs import OutputSpec, PredictionSession
from bioflow.inference.tiling import TilePlan, array_reader, minimum_overlap, predict_tiled, stream_predict
from bioflow.optim import configure_optimization
from bioflow.registry import registry

log = logging.getLogger(__name__)


@dataclass
class DataInfo:
    """What a model needs to know about its data, stored in the checkpoint."""

    in_channels: int
    spatial_dims: int
    pixel_size: list[float] | None = None
    split: dict[str, list[str]] = field(default_factory=dict)
    #: How images are normalised (:meth:`bioflow.data.normalize.Normalizer.as_dict`); None in
    #: models saved before it was stored: percentiles of each image.
    normalization: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "spatial_dims": self.spatial_dims,
            "pixel_size": self.pixel_size,
            "split": self.split,
            "normalization": self.normalization,
        }


class BaseTask(L.LightningModule):
    """Shared training, validation and test logic.

    Parameters
    ----------
    config
        The whole resolved config (plain Python containers).
    data_info
        Channels, dimensionality, pixel size and split of the training data.
    inference
        Build only what prediction needs (no loss, no training transforms).
    """

    #: How targets reach the task: "mask" (label images), "image" (restoration) or "none".
    target_kind: ClassVar[str] = "mask"
    #: What the task hands its loss as target; a loss names the ones it takes in ``bioflow_targets``
    #: (losses that do not say take ``classes``).
    loss_targets: ClassVar[str] = "classes"
    #: Test scores shown as columns of the dashboard's runs table.
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    #: Config sections the task uses besides model, loss, sampler and data; naming another
    #: optional component (e.g. ``batch_transform``) is an error, never silently ignored.
    uses: ClassVar[tuple[str, ...]] = ()
    #: Settings accepted in the ``task`` config section, with their defaults.
    settings: ClassVar[dict[str, Any]] = {}
    #: For settings added after a release: the value that reproduces models saved without them.
    legacy_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any], inference: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config, "data_info": data_info}, logger=False)
        self.config = config
        self.data_info = DataInfo(**data_info)
        self.task_settings = {**self.settings, **component(config["task"])[1]}
        # Channels-last activations: the fast layout of oneDNN (CPU) and cuDNN convolutions (the
        # StarDist network trains ~15% faster on one CPU core); results are the same.
        self._memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}.get(self.data_info.spatial_dims)
        self.net = self.build_network()
        if self._memory_format is not None:
            self.net = self.net.to(memory_format=self._memory_format)
        self.inference = inference
        self.loss_fn = None if inference else self.build_loss()
        self._receptive_field: int | None = None
        self._auto_tile: list[int] | None = None
        self._warned_overlap = False
        self.figure_samples: list[dict[str, np.ndarray]] = []
        self.n_figure_samples = int(config["logger"]["figures"]["n_samples"])
        self.mean_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def target_transform(cls, settings: Mapping[str, Any]):
        """A picklable function applied to each target patch in the data loader (None: as is)."""
        return None

    def out_channels(self) -> int:
        raise NotImplementedError

    def build_network(self) -> torch.nn.Module:
        return self.build_architecture(self.data_info.in_channels, self.out_channels())

    def build_architecture(self, in_channels: int, out_channels: int) -> torch.nn.Module:
        """The configured architecture (``model`` section) with the given channels."""
        name, kwargs = component(self.config["model"])
        provided = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "spatial_dims": self.data_info.spatial_dims,
        }
        for key, value in provided.items():
            if key in kwargs and kwargs[key] != value:
                raise ConfigError(
                    f"model.{key}: set to {kwargs[key]} but the task and data need {value}; remove the key"
                )
            kwargs[key] = value
        factory = registry.load("architectures", name)
        accepted = _parameters(factory)
        if "spatial_dims" not in accepted:
            kwargs.pop("spatial_dims")  # a 2D-only plugin need not take the argument
        return registry.create("architectures", name, where="model", **kwargs)

    def build_postprocessor(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The configured post-processor, or None."""
        node = section(self.config, "postprocessor")
        if node is None:
            return None
        name, kwargs = component(node)
        return registry.create("postprocessors", name, where="postprocessor", **kwargs)

    def build_loss(self) -> torch.nn.Module:
        name, kwargs = component(self.config["loss"])
        return registry.create("losses", name, where="loss", **kwargs)

    def configure_optimizers(self):
        return configure_optimization(
            self.parameters(), self.config, self.trainer.max_epochs, self.monitor, self.monitor_mode,
            total_steps=self.trainer.estimated_stepping_batches,
        )

    # -- monitoring ---------------------------------------------------------------------------
    @property
    def monitor(self) -> str:
        return self.task_settings["monitor"]

    @property
    def monitor_mode(self) -> str:
        return self.task_settings["monitor_mode"]

    # -- prediction ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._memory_format is not None and x.dim() == self.data_info.spatial_dims + 2:
            x = x.contiguous(memory_format=self._memory_format)
        return self.net(x)

    @property
    def size_multiple(self) -> int:
        return int(getattr(self.net, "size_multiple", 1))

    def receptive_field(self) -> int:
        """The network's receptive field in pixels: from the architecture when it says, else probed."""
        if self._receptive_field is None:
            if hasattr(self.net, "receptive_field"):
                self._receptive_field = int(self.net.receptive_field())
            else:
                from bioflow.inference.receptive_field import probe_receptive_field

                self._receptive_field = probe_receptive_field(
                    self.net, self.data_info.in_channels, self.data_info.spatial_dims, self.size_multiple
                )
        return self._receptive_field

    def tiling(
        self, tile_size: Sequence[int] | None = None, overlap: Sequence[int] | None = None, batch_size: int | None = None
    ) -> tuple[list[int], list[int], int]:
        """Tile size, overlap and tiles per batch: given values, else the config's, else automatic.

        The automatic tile fits the free memory of the model's device; the automatic overlap is
        the receptive field (rounded up to even), which makes tiled prediction exact. A smaller
        overlap is allowed with a warning.
        """
        dims = self.data_info.spatial_dims
        cfg = self.config["predict"]
        batch = int(batch_size or cfg["batch_size"])
        tile = tile_size or cfg["tile_size"]
        if tile is None:
            if self._auto_tile is None:
                from bioflow.prediction import auto_tile_size

                self._auto_tile = auto_tile_size(self, str(self.device), batch)
            tile = self._auto_tile
        tile = _per_axis(tile, dims, "tile size")
        needed = minimum_overlap(self.receptive_field())
        chosen = overlap or cfg["overlap"]
        chosen = [needed] * dims if chosen is None else _per_axis(chosen, dims, "overlap")
        if min(chosen) < needed and not self._warned_overlap:
            self._warned_overlap = True
            log.warning(
                "tile overlap %s is below the network's receptive field (%d pixels, overlap %d needed): "
                "tiled predictions will differ slightly from whole-image ones", chosen, self.receptive_field(), needed,
            )
        return tile, chosen, batch

    def output_stride(self) -> tuple[int, ...] | None:
        """How much coarser than the input the network's output grid is (None: the same)."""
        return None

    def predict_image(self, image: torch.Tensor) -> torch.Tensor:
        """Raw network output for one normalised channel-first image tensor (tiled, blended)."""
        tile, overlap, batch = self.tiling()
        return predict_tiled(self, image, tile, overlap, self.receptive_field(), self.size_multiple,
                             batch_size=batch, stride=self.output_stride())

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
    ) -> None:
        """Predict a raw channel-first image of any size (numpy, memory map or lazy TIFF).

        The image is normalised as in training (:meth:`normalizer`, unless ``norm`` is given),
        read tile by tile, and the raw output is handed to ``sink(start, block)`` strip by strip
        along the first spatial axis.
        """
        if norm is None:
            norm = self.normalizer().norm_for(image)
        tile, overlap, batch = self.tiling(tile_size, overlap, batch_size)
        shape = tuple(image.shape[1:])
        plan = TilePlan.create(shape, tile, overlap, self.receptive_field(), self.size_multiple, blend)
        stream_predict(
            self, array_reader(image, self.device, transform=norm), shape, plan, sink, batch_size=batch,
            tta=tta, channel_map=self.tta_channel_map(), device=self.device, progress=progress,
            stride=self.output_stride(),
        )

    @property
    def channel_selection(self) -> list | None:
        """The channels of the input files the model uses (``data.channels``; None: all)."""
        return self.config["data"].get("channels")

    def normalizer(self):
        """How this model normalises images (as stored with it)."""
        from bioflow.data.normalize import Normalizer

        return Normalizer.from_dict(self.data_info.normalization, self.config["data"]["normalize"])

    def tta_channel_map(self):
        """How output channels change under flips and quarter turns (None: they do not)."""
        return None

    def prediction_outputs(self) -> list[OutputSpec]:
        """The images ``bioflow predict`` writes per input (the first is the main result)."""
        raise NotImplementedError

    def prediction_session(self, shape: Sequence[int], workdir: Any = None) -> PredictionSession:
        """What turns strips of raw output of one image of ``shape`` into the outputs."""
        raise NotImplementedError

    def prediction_caveats(self) -> list[str]:
        """What users must know about this kind of model when they apply it."""
        return []

    # -- after training ---------------------------------------------------------------------------
    def after_fit(self, data) -> dict[str, float]:
        """Work on the best weights once training is over (e.g. choosing thresholds on the
        validation split); returns values to record in the run. The weights' buffers may change."""
        return {}

    def report_figures(self, metrics: Mapping[str, float], folder) -> list:
        """Figures of evaluation results written into ``folder`` (paths), logged with the run."""
        return []

    # -- steps ------------------------------------------------------------------------------------
    def loss_target(self, target: torch.Tensor) -> torch.Tensor:
        """What the loss compares the output with, made from a batch of targets (default: as is)."""
        return target

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        output = self(batch["image"])
        loss = self.loss_fn(output, self.loss_target(batch["target"]))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "lower optimizer.lr or check the data for extreme values"
            )
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch["image"].shape[0])
        return loss

    def _evaluate_step(self, batch: dict[str, Any], stage: str) -> None:
        image, target = batch["image"][0], batch["target"][0]
        output = self.predict_image(image)
        self.mean_loss[stage].update(self.loss_fn(output[None], self.loss_target(target[None])))
        prediction = self.postprocess(output)
        self.update_metrics(stage, prediction, target)
        if self.wants_figure_sample(stage):
            self.collect_figure_sample(stage, batch, image, target, prediction, self.image_scores(prediction, target))

    def wants_figure_sample(self, stage: str) -> bool:
        return stage == "val" and len(self.figure_samples) < self.n_figure_samples

    def collect_figure_sample(self, stage: str, batch, image, target, prediction, scores=None) -> None:
        """Keep the first few validation images for the epoch's figure (``target`` may be None;
        ``scores``: this image's scores for the figure's titles)."""
        if self.wants_figure_sample(stage):
            self.figure_samples.append(
                {
                    "name": batch["name"][0],
                    "image": image.detach().cpu().numpy(),
                    "target": None if target is None else target.detach().cpu().numpy(),
                    "prediction": prediction.detach().cpu().numpy(),
                    "scores": dict(scores or {}),
                }
            )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.figure_samples = []

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    def _end_evaluation(self, stage: str) -> None:
        self.log(f"{stage}/loss", self.mean_loss[stage].compute())
        self.mean_loss[stage].reset()
        self.log_metrics(stage)

    # -- subclass hooks -----------------------------------------------------------------------
    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Turn the raw output for one image into the prediction the metrics compare."""
        raise NotImplementedError

    def update_metrics(self, stage: str, prediction: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def image_scores(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Scores of one image, for the titles of the validation figures (default: none)."""
        return {}

    def log_metrics(self, stage: str) -> None:
        raise NotImplementedError

    def log_scores(self, stage: str, scores: Mapping[str, torch.Tensor]) -> None:
        """Log computed (already synced) scores, skipping undefined ones."""
        for key, value in scores.items():
            value = torch.as_tensor(value, dtype=torch.float32)
            if not math.isnan(float(value)):
                self.log(f"{stage}/{key}", value, sync_dist=False, rank_zero_only=False)

    # -- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        run_id = getattr(self.logger, "run_id", None) if self.logger is not None else None
        checkpoint["bioflow"] = {
            "version": __version__,
            "task": self.config["task"]["name"],
            "components": used_components(self.config),
            "run_id": run_id,
        }


def _per_axis(values: Sequence[int], dims: int, what: str) -> list[int]:
    """One value per spatial axis from one value or ``dims`` values."""
    values = [int(v) for v in values]
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise ConfigError(f"predict: {what} {values} needs 1 or {dims} values for {dims}D images")
    return values


def _parameters(factory) -> Sequence[str]:
    import inspect

    try:
        return list(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return []


#: Config sections that name registry components, with their kinds.
COMPONENT_SECTIONS: dict[str, str] = {
    "model": "architectures",
    "loss": "losses",
    "sampler": "samplers",
    "data.source": "datasets",
    "postprocessor": "postprocessors",
    "batch_transform": "batch_transforms",
}


def section(config: Mapping[str, Any], path: str) -> Mapping[str, Any] | None:
    """The config section at a dotted ``path``, or None if it is absent or null."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return None
        node = node[part]
    return node


def used_components(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Name, arguments, distribution and version of every component the config uses."""
    out: dict[str, dict[str, Any]] = {}
    for path, kind in COMPONENT_SECTIONS.items():
        node = section(config, path)
        if node is None:
            continue
        name, kwargs = component(node)
        out[path] = {"kind": kind, "kwargs": kwargs, **registry.describe(kind, name)}
    return out
