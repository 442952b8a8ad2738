"""The train widget: a model trained from layers (an image and its labels, an image and its target,
or a noisy image alone) or from folders, with live curves; the run lands in the project's MLflow
store like a ``bioflow train`` run and then appears in the predict widgets."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from magicgui import widgets

from bioflow.errors import BioflowError, ConfigError
from bioflow.napari import common
from bioflow.napari.jobs import Cancelled, TrainingJob
from bioflow.napari.layers import (DATA_FOR_TARGET, TrainingData, check_layer_data, layer_pixel_size, training_axes,
                                   write_training_data)
from bioflow.napari.models import experiments_for, headline, task_names

NONE = "(none)"
DEFAULTS = "(task defaults)"


class Curves:
    """Live curves: the training loss by step and the validation metrics by epoch."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 3), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(220)
        self.loss_axes = self.figure.add_subplot(2, 1, 1)
        self.val_axes = self.figure.add_subplot(2, 1, 2)
        self.clear()

    def clear(self) -> None:
        self.loss: list[tuple[int, float]] = []
        self.validation: list[tuple[int, dict[str, float]]] = []
        self.draw()

    def add(self, kind: str, step: int, value: Any) -> None:
        (self.loss if kind == "loss" else self.validation).append((step, value))
        if kind != "loss" or len(self.loss) % 5 == 1:
            self.draw()

    def draw(self) -> None:
        self.loss_axes.clear()
        self.val_axes.clear()
        self.loss_axes.set_ylabel("training loss", fontsize=8)
        self.val_axes.set_ylabel("validation", fontsize=8)
        self.val_axes.set_xlabel("epoch", fontsize=8)
        if self.loss:
            self.loss_axes.plot(*zip(*self.loss), lw=0.8)
        names = sorted({k for _, m in self.validation for k in m})
        for name in names[:4]:
            points = [(e, m[name]) for e, m in self.validation if name in m]
            self.val_axes.plot(*zip(*points), marker="o", ms=3, label=name.removeprefix("val/"))
        if names:
            self.val_axes.legend(fontsize=6)
        for axes in (self.loss_axes, self.val_axes):
            axes.tick_params(labelsize=7)
        self.canvas.draw_idle()


class TrainWidget(widgets.Container):
    """Train a model from layers or folders, in a worker thread, with live curves."""

    def __init__(self, napari_viewer) -> None:
        from bioflow.tracking.store import default_project_dir

        super().__init__(labels=True)
        self.viewer = napari_viewer
        tasks = task_names()
        self.task = widgets.ComboBox(label="task", choices=tasks, value="stardist" if "stardist" in tasks else tasks[0])
        self.experiment = widgets.ComboBox(label="experiment", choices=self._experiments)
        self.source = widgets.RadioButtons(label="data from", choices=["layers", "folders"], value="layers",
                                           orientation="horizontal")
        self.image = widgets.ComboBox(label="image layer", choices=self._image_layers)
        self.target = widgets.ComboBox(label="labels layer", choices=self._target_layers)
        self.axes = widgets.LineEdit(label="axes", value="", tooltip="the image layer's axes, e.g. YX, ZYX, TYX, CYX; "
                                     "empty: a 3D layer is a volume for tasks that take volumes, else frames")
        self.images = widgets.FileEdit(label="images folder", mode="d", visible=False)
        self.targets = widgets.FileEdit(label="masks folder", mode="d", visible=False)
        self.epochs = widgets.SpinBox(label="epochs", value=20, min=1, max=10000)
        self.steps = widgets.SpinBox(label="steps per epoch", value=50, min=1, max=100000)
        self.batch = widgets.SpinBox(label="batch size", value=8, min=1, max=1024)
        self.patch = widgets.LineEdit(label="patch size", value="", tooltip="e.g. 64,64 or 16,64,64; empty: the experiment's")
        self.name = widgets.LineEdit(label="experiment name", value="napari",
                                     tooltip="the MLflow experiment the run is recorded in")
        self.project = widgets.FileEdit(label="project", mode="d", value=default_project_dir())
        self.more = widgets.LineEdit(label="more settings", value="",
                                     tooltip="further bioflow train overrides, e.g. model.base_channels=16 seed=1")
        self.go = widgets.PushButton(text="train")
        self.stop = widgets.PushButton(text="stop (keep best)", enabled=False)
        self.cancel_button = widgets.PushButton(text="cancel", enabled=False)
        self.bar = widgets.ProgressBar(label="epochs", value=0, min=0, max=1)
        self.status = widgets.Label(label="", value="")
        self.curves = Curves()
        self.extend([self.task, self.experiment, self.source, self.image, self.target, self.axes, self.images, self.targets,
                     self.epochs, self.steps, self.batch, self.patch, self.name, self.project, self.more,
                     widgets.Container(widgets=[self.go, self.stop, self.cancel_button], layout="horizontal", labels=False),
                     self.bar, self.status])
        self.native.layout().addWidget(self.curves.canvas)
        common.compact(self)
        self.job: TrainingJob | None = None
        self.worker = None
        self.summary: dict[str, Any] | None = None
        self.relay = common.Relay()
        self.relay.event.connect(self._event)
        self.task.changed.connect(self._task_changed)
        self.source.changed.connect(self._source_changed)
        self.go.changed.connect(self.train)
        self.stop.changed.connect(self.stop_early)
        self.cancel_button.changed.connect(self.cancel)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(lambda *_: (self.image.reset_choices(), self.target.reset_choices()))
        self._task_changed()

    # -- choices --------------------------------------------------------------------------------
    def target_kind(self) -> str:
        from bioflow.tasks import get_task

        return get_task(self.task.value).target_kind

    def _experiments(self, *_):
        found = experiments_for(self.task.value) if getattr(self, "task", None) is not None else []
        own = sorted(found, key=lambda n: (not n.endswith("_own_data"), n))  # the own-data recipes first
        return [*own, DEFAULTS]

    def _image_layers(self, *_):
        from napari.layers import Image

        return [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]

    def _target_layers(self, *_):
        from napari.layers import Image, Labels

        if getattr(self, "task", None) is None:
            return [NONE]
        kind = DATA_FOR_TARGET.get(self.target_kind(), (None, "masks"))[1]
        wanted = Labels if kind == "masks" else Image
        return [NONE] if kind is None else [layer.name for layer in self.viewer.layers if isinstance(layer, wanted)]

    def _task_changed(self, *_) -> None:
        kind = DATA_FOR_TARGET.get(self.target_kind(), (None, "masks"))[1]
        self.target.label = {"masks": "labels layer", "targets": "target layer", None: "target"}[kind]
        self.targets.label = {"masks": "masks folder", "targets": "targets folder", None: "targets"}[kind]
        self.experiment.reset_choices()
        self.experiment.value = self.experiment.choices[0]  # the task's own-data recipe, when it has one
        self.target.reset_choices()
        self._source_changed()

    def task_dims(self) -> tuple[int, ...]:
        """The spatial dimensions the chosen task takes (StarDist: 2D or 3D; the others: both)."""
        from bioflow.tasks import get_task

        return tuple(getattr(get_task(self.task.value), "bioflow_spatial_dims", (2, 3)))

    def has_target(self) -> bool:
        """Whether the task learns from pairs (labels or target images), not from images alone."""
        return DATA_FOR_TARGET.get(self.target_kind(), (None, "masks"))[1] is not None

    def _source_changed(self, *_) -> None:
        layers = self.source.value == "layers"
        has_target = self.has_target()
        self.image.visible, self.target.visible, self.axes.visible = layers, layers and has_target, layers
        self.images.visible, self.targets.visible = not layers, not layers and has_target

    # -- training -------------------------------------------------------------------------------
    def say(self, kind: str, text: str) -> None:
        self.status.value = text
        common.tell(kind, text)

    def overrides(self) -> tuple[list[str], list[Path]]:
        """The training overrides of the widget's settings, and what was written for them (the
        layers as files, kept with the run and removed if it is cancelled)."""
        task = self.task.value
        out = [f"task={task}"] if self.experiment.value == DEFAULTS else [f"experiment={self.experiment.value}", f"task={task}"]
        written: list[Path] = []
        kind = self.target_kind()
        if self.source.value == "layers":
            if self.image.value is None:
                raise BioflowError("train: open an image layer first (or train from folders)")
            layer = self.viewer.layers[self.image.value]
            image = check_layer_data(layer.data, layer.name, multiscale=bool(getattr(layer, "multiscale", False)))
            axes = self.axes.value.strip().upper() or training_axes(
                image.shape, self.task_dims(), rgb=bool(getattr(layer, "rgb", False)), name=layer.name)
            targets = {}
            if self.has_target():
                if self.target.value in (None, NONE):
                    raise BioflowError(f"train: choose the {self.target.label} for {self.image.value}")
                target = self.viewer.layers[self.target.value]
                targets[layer.name] = check_layer_data(target.data, target.name, multiscale=bool(getattr(target, "multiscale", False)))
            data = TrainingData({layer.name: image}, targets, axes=axes, pixel_size=layer_pixel_size(layer, axes))
            folder, data_overrides = write_training_data(data, kind, self.project.value)
            written.append(folder)
            out += data_overrides
        else:
            config, target_folder = DATA_FOR_TARGET.get(kind, ("tiff_folder", "masks"))
            out.append(f"data={config}")
            for what, edit in [("images", self.images)] + ([(target_folder, self.targets)] if target_folder else []):
                path = str(edit.value or "").strip()
                if path in ("", ".") or not Path(path).is_dir():
                    raise BioflowError(f"train: choose the {what} folder" + (f" ({path} is not a folder)" if path not in ("", ".") else ""))
                out.append(f"data.source.{what}={Path(path).resolve()}")
        out += [f"trainer.max_epochs={self.epochs.value}", f"data.batch_size={self.batch.value}",
                f"data.patches_per_epoch={self.steps.value * self.batch.value}", f"logger.experiment_name={self.name.value}"]
        if self.patch.value.strip():
            try:
                sizes = [int(v) for v in self.patch.value.replace("x", ",").split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"patch size '{self.patch.value}': whole numbers such as 64,64") from None
            out.append(f"data.patch_size=[{','.join(map(str, sizes))}]")
        try:
            out += shlex.split(self.more.value)
        except ValueError as exc:
            raise ConfigError(f"more settings: {exc}") from None
        return out, written

    def train(self, *_) -> None:
        """Start training (returns at once; curves update as it runs)."""
        if self.worker is not None:
            return
        self.summary = None
        try:
            overrides, written = self.overrides()
        except Exception as exc:
            self.say("error", common.message(exc))
            return
        self.curves.clear()
        self.summary = None
        self.bar.max, self.bar.value = int(self.epochs.value), 0
        job = self.job = TrainingJob(overrides, self.project.value, discard=written,
                                     on_event=lambda kind, step, value: self.relay.event.emit(kind, step, value))
        self.go.enabled, self.stop.enabled, self.cancel_button.enabled = False, True, True
        self.status.value = "training ..."
        self.worker = common.start(self, job.run, self._done, self._failed, self._finished)

    def stop_early(self, *_) -> None:
        if self.job is not None:
            self.job.stop()
            self.status.value = "stopping after this step (the best model is kept) ..."

    def cancel(self, *_) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status.value = "cancelling (nothing will be kept) ..."

    def _event(self, kind: str, step: int, value: Any) -> None:
        if not common.alive(self):  # the viewer was closed while training: keep nothing
            if self.job is not None:
                self.job.cancel()
            return
        self.curves.add(kind, step, value)
        if kind == "validation":
            self.bar.value = min(self.bar.max, step)
            shown = ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in sorted(value.items())[:3])
            self.status.value = f"epoch {step}: {shown}"

    def _done(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        name, score = headline(self.task.value, summary.get("test") or {})
        shown = "" if name is None else f"test {name.removeprefix('test/')} {score:.3f}"
        self.say("info", f"run {summary['run_id'][:8]} finished{': ' + shown if shown else ''} "
                         f"(experiment {summary['experiment']}; now in the predict widget)")
        common.announce_run(summary["run_id"])

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self.status.value = "cancelled: the run and its files were removed"
        else:
            self.say("error", common.message(exc))

    def _finished(self) -> None:
        self.worker = None
        self.job = None
        self.go.enabled, self.stop.enabled, self.cancel_button.enabled = True, False, False
