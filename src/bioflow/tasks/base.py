"""The task template: what every bioflow task shares, and the hooks a method fills in.

A task is a LightningModule registered under the entry-point group ``bioflow.tasks``. Its settings
are the keyword arguments of its constructor after ``config`` (the resolved config),
``data_info`` (:class:`~bioflow.data.info.DataInfo` as a dict) and ``inference``; the ``task``
config section is checked against that signature before training (see docs/writing-a-task.md).

The base builds the model and the loss, trains on patches (``training_pair``), validates and tests
whole images through tiled prediction (:class:`~bioflow.inference.predictor.TiledPredictor`),
keeps validation figures, checks the loss stays finite and records the task in checkpoints.
A task implements ``out_channels()`` (or ``build_model()``), ``evaluate_image(stage, batch)``,
``log_metrics(stage)``, ``prediction_outputs()`` and ``prediction_session(shape, workdir)``; it may
override ``target_transform``, ``loss_target``, ``training_pair``, ``loss_input``, ``decode``,
``after_fit``, ``report_figures``, ``output_stride``, ``tta_channel_map``, and the model-exchange
hooks of :class:`~bioflow.tasks.exchange.ModelExchange` (title, citations, tags, caveat, package
outputs and config), whose defaults let any task export.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, ClassVar, Iterator, Mapping

import lightning as L
import torch
from torchmetrics import MeanMetric

from bioflow.version import __version__
from bioflow.config import component, used_components
from bioflow.data.info import DataInfo
from bioflow.errors import ConfigError
from bioflow.kinds import kind
from bioflow.inference.predictor import TiledPredictor
from bioflow.models.folding import fold_batch_norms
from bioflow.optim import configure_optimization
from bioflow.precision import inference_autocast
from bioflow.registry import registry
from bioflow.tasks.context import TaskContext
from bioflow.tasks.exchange import ModelExchange

_CONTEXT = kind("tasks").provided
#: Set while a task is built around a network that comes from elsewhere (a bioimage.io package).
_WITHOUT_NETWORK: contextvars.ContextVar[bool] = contextvars.ContextVar("bioflow_without_network", default=False)


@contextlib.contextmanager
def without_network() -> Iterator[None]:
    """Tasks created in this block get a placeholder instead of their configured network, to be
    replaced by the caller (e.g. by the network of a bioimage.io package, whose architecture need
    not be installed)."""
    token = _WITHOUT_NETWORK.set(True)
    try:
        yield
    finally:
        _WITHOUT_NETWORK.reset(token)


def full_precision(device: torch.device):
    """No training autocast: validation and testing run the network in the prediction precision
    (``predict.precision``, float32 by default) whatever precision trains it
    (``trainer.precision``), so their scores are the ones ``bioflow predict`` and ``bioflow
    evaluate`` reproduce."""
    return torch.autocast(device_type=device.type, enabled=False)


class BaseTask(TiledPredictor, ModelExchange, L.LightningModule):
    """Shared training, validation and test logic of a bioflow task (see the module docstring)."""

    #: How targets reach the task: "mask" (label images), "image" (restoration), "optional_image".
    target_kind: ClassVar[str] = "mask"
    #: The loss target the task hands its loss; a loss names those it takes in its own
    #: ``bioflow_targets`` (default class indices). Formerly ``loss_targets`` (a string), still read.
    bioflow_targets: ClassVar[tuple[str, ...]] = ("classes",)
    #: Optional config sections the task uses (``postprocessor``, ``batch_transform``): naming any
    #: other is an error before training, never silently ignored.
    uses: ClassVar[tuple[str, ...]] = ()
    #: Test scores shown as columns of the dashboard's runs table.
    headline_metrics: ClassVar[tuple[str, ...]] = ()
    #: For settings added after a release: the value that reproduces models saved without them.
    legacy_settings: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "loss_targets" in cls.__dict__ and "bioflow_targets" not in cls.__dict__:  # a plugin of an earlier release
            import warnings

            warnings.warn(f"{cls.__qualname__}: the task attribute 'loss_targets' is now 'bioflow_targets' (a tuple, as "
                          "losses declare theirs); the old name is read until the next release", DeprecationWarning,
                          stacklevel=2)
            cls.bioflow_targets = (str(cls.__dict__["loss_targets"]),)

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any], inference: bool = False, **_: Any) -> None:
        super().__init__()
        # Collects the subclass's settings too (Lightning reads the constructors' arguments).
        self.save_hyperparameters(logger=False, ignore=["inference", "_"])
        self.config = config  # saved with the model; the task itself reads self.context
        self.context = TaskContext.from_config(config)
        self.data_info = DataInfo(**data_info)
        self.task_settings = {k: v for k, v in self.hparams.items() if k not in _CONTEXT}
        self.monitor, self.monitor_mode = self.task_settings["monitor"], self.task_settings["monitor_mode"]
        self.inference = inference
        # Channels-last activations: the fast layout of oneDNN (CPU) and cuDNN convolutions.
        self._memory_format = {2: torch.channels_last, 3: torch.channels_last_3d}.get(self.data_info.spatial_dims)
        self.model = torch.nn.Identity() if _WITHOUT_NETWORK.get() else self.build_model()
        self._inference_copy: tuple | None = None  # (weights' identity, folded copy): see inference_network
        if self._memory_format is not None:
            self.model = self.model.to(memory_format=self._memory_format)
        self.loss_fn = None if inference else self.build_loss()
        self.figure_samples: list[dict[str, Any]] = []
        self.n_figure_samples = self.context.figure_samples
        self.mean_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    # -- components ---------------------------------------------------------------------------
    @classmethod
    def settings_from_data(cls, settings: Mapping[str, Any], records) -> dict[str, Any]:
        """Settings the task takes from the data where the config leaves them unset (e.g. the number
        of classes in the masks), after checking the data's targets fit the settings given.

        Called with the task's settings and every record of the source (all splits) before the task
        is built for training; what it returns is recorded in the run's config. Default: nothing.
        """
        return {}

    @classmethod
    def target_transform(cls, settings: Mapping[str, Any]):
        """A picklable function applied to each target patch in the data loader (None: as is)."""
        return None

    def out_channels(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement out_channels() or build_model()")

    def build_model(self, in_channels: int | None = None, out_channels: int | None = None) -> torch.nn.Module:
        """The configured model (``model`` section) with the data's (or the given) channels."""
        name, kwargs = component(self.context.model)
        provided = {"in_channels": self.data_info.in_channels if in_channels is None else in_channels,
                    "out_channels": self.out_channels() if out_channels is None else out_channels,
                    "spatial_dims": self.data_info.spatial_dims}
        for key, value in provided.items():
            if key in kwargs and kwargs[key] != value:
                raise ConfigError(f"model.{key}: set to {kwargs[key]} but the task and data need {value}; remove the key")
            kwargs[key] = value
        if "spatial_dims" not in registry.parameters("models", name):
            kwargs.pop("spatial_dims")  # a 2D-only plugin need not take the argument
        return registry.create("models", name, where="model", **kwargs)

    def build_loss(self) -> torch.nn.Module:
        name, kwargs = component(self.context.loss)
        return registry.create("losses", name, where="loss", **kwargs)

    def configure_optimizers(self):
        sections = {"optimizer": self.context.optimizer, "scheduler": self.context.scheduler}
        return configure_optimization(self.parameters(), sections, self.trainer.max_epochs, self.monitor,
                                      self.monitor_mode, total_steps=self.trainer.estimated_stepping_batches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._memory_format is not None and x.dim() == self.data_info.spatial_dims + 2:
            x = x.contiguous(memory_format=self._memory_format)
        if self.model.training or torch.is_grad_enabled():
            return self.model(x)
        with inference_autocast(self.context.predict.get("precision"), x.device):
            out = self.inference_network()(x)
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out

    def inference_network(self) -> torch.nn.Module:
        """The network for prediction without gradients: a copy with its batch norms folded into the
        convolutions (``bioflow.models.folding``; same outputs up to rounding, one pass fewer per
        layer), made again whenever the weights have changed (e.g. between validation epochs)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        if self._inference_copy is None or self._inference_copy[0] != key:
            self._inference_copy = (key, fold_batch_norms(self.model))
        return self._inference_copy[1]

    # -- training -----------------------------------------------------------------------------
    def loss_target(self, target: torch.Tensor) -> torch.Tensor:
        """What the loss compares the output with, made from a batch of targets (default: as is)."""
        return target

    def loader_loss_target(self):
        """A picklable function ``targets -> loss target`` that the training data loader applies to
        each collated batch (in its worker processes when ``data.num_workers > 0``, so off the
        training step; see ``loss_target``), or None: ``loss_target`` runs in the training step."""
        return None

    def training_pair(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's input and the loss's target for a training batch (the loss target the
        data loader made, if it made one)."""
        made = batch.get("loss_target")
        return batch["image"], self.loss_target(batch["target"]) if made is None else made

    def loss_input(self, output: torch.Tensor) -> torch.Tensor:
        """What the loss takes from the network's output for a batch (default: as is)."""
        return output

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        inputs, target = self.training_pair(batch)
        loss = self.loss_fn(self.loss_input(self(inputs)), target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at epoch {self.current_epoch}, step "
                                     f"{self.global_step}; lower optimizer.lr or check the data for extreme values")
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=inputs.shape[0])
        return loss

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate_image(self, stage: str, batch: dict[str, Any]) -> None:
        """Evaluate one whole image (batch of one) of ``stage`` ("val" or "test")."""
        raise NotImplementedError

    def log_metrics(self, stage: str) -> None:
        raise NotImplementedError

    def decode(self, output: torch.Tensor) -> torch.Tensor:
        """The prediction the metrics compare, from the raw output for one image (default: as is)."""
        return output

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        with full_precision(self.device):
            self.evaluate_image("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from bioflow.inference.fit import FitObserver

        verdicts = getattr(self, "fit_verdicts", None)  # bioflow evaluate: the fit check rides along
        watch = verdicts is not None and getattr(self, "fit_reference", None) is not None
        with full_precision(self.device), (FitObserver(self) if watch else contextlib.nullcontext()) as seen:
            if seen is not None:
                seen.expect(batch["image"][0])  # the image's own prediction, not its masked copies
            self.evaluate_image("test", batch)
        if seen is not None and seen.kept:  # else the task never predicted the image itself: checked on its own later
            verdicts[batch["name"][0]] = seen.verdict()

    def on_validation_epoch_start(self) -> None:
        self.figure_samples = []

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    def _end_evaluation(self, stage: str) -> None:
        if self.mean_loss[stage].update_count:
            self.log(f"{stage}/loss", self.mean_loss[stage].compute())
        self.mean_loss[stage].reset()
        self.log_metrics(stage)

    def log_scores(self, stage: str, scores: Mapping[str, Any]) -> None:
        """Log computed (already synced) scores, skipping undefined ones."""
        for key, value in scores.items():
            value = torch.as_tensor(value, dtype=torch.float32)
            if not math.isnan(float(value)):
                self.log(f"{stage}/{key}", value, sync_dist=False, rank_zero_only=False)

    def wants_figure_sample(self, stage: str) -> bool:
        return stage == "val" and len(self.figure_samples) < self.n_figure_samples

    def collect_figure_sample(self, stage: str, batch, image, target, prediction, scores=None) -> None:
        """Keep the first few validation images for the epoch's figure (``target`` may be None;
        ``scores``: this image's scores for the figure's titles)."""
        if self.wants_figure_sample(stage):
            as_array = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
            self.figure_samples.append({"name": batch["name"][0], "image": as_array(image), "target": as_array(target),
                                        "prediction": as_array(prediction), "scores": dict(scores or {})})

    # -- after training --------------------------------------------------------------------------
    def after_fit(self, data) -> dict[str, float]:
        """Work on the best weights once training is over (e.g. choosing thresholds on the
        validation split); returns values to record in the run. The weights' buffers may change."""
        return {}

    def report_figures(self, metrics: Mapping[str, float], folder) -> list:
        """Figures of evaluation results written into ``folder`` (paths), logged with the run."""
        return []

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bioflow"] = {"version": __version__, "task": self.context.name,
                                 "components": used_components(self.config),
                                 "run_id": getattr(self.logger, "run_id", None) if self.logger is not None else None}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        # models saved before the network was called ``model`` kept it under ``net.``
        state_dict = {("model." + k[4:] if k.startswith("net.") else k): v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
