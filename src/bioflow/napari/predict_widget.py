"""The predict widget: a model (a run of the project's store, a checkpoint file or a bioimage.io
package) applied to an image layer; the outputs become layers on the image's grid."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from magicgui import widgets

from bioflow.napari import common
from bioflow.napari.jobs import Cancelled, PredictionJob, thresholds_of
from bioflow.napari.layers import check_layer_data, guess_axes, result_layers
from bioflow.napari.models import RunChoice, list_runs

NO_RUN = "(no trained model in this project)"


class PredictWidget(widgets.Container):
    """Predict an image layer with a bioflow model, in a worker thread (the viewer stays usable)."""

    def __init__(self, napari_viewer) -> None:
        from bioflow.tracking.store import default_project_dir

        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.project = widgets.FileEdit(label="project", mode="d", value=default_project_dir(),
                                        tooltip="the project folder whose MLflow store holds the runs")
        self.run = widgets.ComboBox(label="run", choices=self._run_choices, tooltip="trained runs: experiment / name (task, test score)")
        self.refresh = widgets.PushButton(text="refresh runs")
        self.file = widgets.FileEdit(label="or a file", mode="r", filter="*.ckpt *.zip *.yaml", value="",
                                     tooltip="a checkpoint (.ckpt) or a bioimage.io package (.zip, rdf.yaml); used when set")
        self.image = widgets.ComboBox(label="image", choices=self._image_layers)
        self.tile = widgets.SpinBox(label="tile size", value=0, min=0, max=8192, step=16,
                                    tooltip="edge of the tiles in pixels; 0: chosen from free memory")
        self.tta = widgets.CheckBox(label="TTA", value=False, tooltip="average over flips and quarter turns")
        self.spread = widgets.CheckBox(label="TTA spread", value=False,
                                       tooltip="also the spread between the augmented predictions (an uncertainty map)")
        self.confidence = widgets.CheckBox(label="confidence map", value=False, visible=False,
                                           tooltip="segmentation (U-Net) models: also a per-pixel confidence map")
        self.prob = widgets.FloatSpinBox(label="probability threshold", value=0.5, min=0.01, max=0.99, step=0.01, visible=False)
        self.nms = widgets.FloatSpinBox(label="overlap threshold", value=0.4, min=0.0, max=1.0, step=0.05, visible=False)
        self.go = widgets.PushButton(text="predict")
        self.stop = widgets.PushButton(text="cancel", enabled=False)
        self.bar = widgets.ProgressBar(label="tiles", value=0, min=0, max=1)
        self.status = widgets.Label(label="", value="")
        self.extend([self.project, self.run, self.refresh, self.file, self.image, self.tile, self.tta, self.spread,
                     self.confidence, self.prob, self.nms, widgets.Container(widgets=[self.go, self.stop], layout="horizontal", labels=False),
                     self.bar, self.status])
        self._runs: dict[str, RunChoice] = {}
        common.compact(self)
        self.has_thresholds = self.gives_confidence = False
        self._shown_thresholds: tuple[float, float] | None = None
        self._thresholds_for: int | None = None
        self._models: dict[str, Any] = {}
        self.job: PredictionJob | None = None
        self.worker = None
        self.loader = None
        self._loading = threading.Lock()
        self.relay = common.Relay()
        self.relay.progressed.connect(self._progressed)
        self.project.changed.connect(self.refresh_runs)
        self.refresh.changed.connect(self.refresh_runs)
        self.run.changed.connect(self._model_changed)
        self.file.changed.connect(self._model_changed)
        self.go.changed.connect(self.predict)
        self.stop.changed.connect(self.cancel)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._layers_changed)
        common.on_new_run(self._new_run)
        self.refresh_runs()

    # -- choices --------------------------------------------------------------------------------
    def _image_layers(self, *_):
        from napari.layers import Image

        return [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]

    def _run_choices(self, *_):
        # a callable, as napari resets every choice of a dock widget when layers change
        return list(getattr(self, "_runs", None) or {}) or [NO_RUN]

    def _layers_changed(self, *_) -> None:
        self.image.reset_choices()

    def _new_run(self, run_id: str) -> None:
        self.refresh_runs()

    def refresh_runs(self, *_) -> None:
        """List the finished runs of the project's store (the newest first)."""
        try:
            runs = list_runs(self.project.value)
        except Exception as exc:
            runs = []
            self.say("error", common.message(exc))
        self._runs = {r.label: r for r in runs}
        self.run.reset_choices()
        self._model_changed()

    def model_reference(self) -> str | None:
        """What to load: the file when one is set, else the chosen run."""
        path = str(self.file.value or "").strip()
        if path not in ("", "."):
            return path  # loading says what is wrong with it, if anything
        choice = self._runs.get(self.run.value)
        return choice.run_id if choice else None

    def _model_changed(self, *_) -> None:
        """Show the chosen model's settings (StarDist's thresholds), loading it in the background."""
        ref = self.model_reference()
        self._show_thresholds(self._models.get(ref))
        if ref is None or ref in self._models or self.loader is not None:
            return

        def loaded(model) -> None:
            if self.model_reference() == ref:
                self._show_thresholds(model)
                self.run.tooltip = str(model)

        def failed(exc: BaseException) -> None:
            if self.worker is None:  # a prediction under way says it itself
                self.status.value = common.message(exc)

        def done() -> None:
            self.loader = None
            if self.model_reference() != ref:
                self._model_changed()  # the choice changed while loading

        self.loader = common.start(self, lambda: self.load(ref), loaded, failed, done)

    def _show_thresholds(self, model) -> None:
        found = None if model is None else thresholds_of(model.task)
        self.has_thresholds = found is not None  # (`visible` is False too while the viewer is hidden)
        self.prob.visible = self.nms.visible = self.has_thresholds
        self.gives_confidence = bool(getattr(getattr(model, "task", None), "gives_confidence", False))
        self.confidence.visible = self.gives_confidence
        shown_for = None if model is None else id(model)
        if found is not None and shown_for != self._thresholds_for:  # the user's values stay until the model changes
            self.prob.value, self.nms.value = found
            self._shown_thresholds = (float(self.prob.value), float(self.nms.value))
        self._thresholds_for = shown_for

    def load(self, ref: str):
        """The model (cached); loading from a run downloads its checkpoint once."""
        with self._loading:
            return self._load(ref)

    def _load(self, ref: str):
        if ref not in self._models:
            from bioflow.api import load_model

            is_run = ref in {r.run_id for r in self._runs.values()}
            self._models[ref] = load_model(ref, project_dir=self.project.value) if is_run else load_model(ref)
        return self._models[ref]

    # -- predicting -----------------------------------------------------------------------------
    def say(self, kind: str, text: str) -> None:
        self.status.value = text
        common.tell(kind, text)

    def predict(self, *_) -> None:
        """Start predicting the chosen layer (returns at once; the worker adds the layers)."""
        if self.worker is not None:
            return
        ref = self.model_reference()
        if ref is None:
            self.say("error", "predict: choose a trained run or a model file")
            return
        if self.image.value is None:
            self.say("error", "predict: open an image layer first")
            return
        layer = self.viewer.layers[self.image.value]
        options: dict[str, Any] = {"tta": bool(self.tta.value), "tta_spread": bool(self.spread.value),
                                   "confidence": bool(self.confidence.value) and self.gives_confidence}
        if self.tile.value:
            options["tile_size"] = int(self.tile.value)
        chosen = (float(self.prob.value), float(self.nms.value))
        # the model's own thresholds unless changed here (the boxes show them rounded)
        thresholds = chosen if self.has_thresholds and chosen != self._shown_thresholds else None
        source = layer.name
        scale, translate = list(layer.scale), list(layer.translate)

        job = self.job = PredictionJob(None, None, "", options, thresholds)  # cancellable from now on

        def work():
            job.model = self.load(ref)
            job.image = check_layer_data(layer.data, source, multiscale=bool(getattr(layer, "multiscale", False)))
            info = job.model.task.data_info
            job.axes = guess_axes(job.image.shape, info.spatial_dims, info.in_channels,
                                  rgb=bool(getattr(layer, "rgb", False)), name=source)
            return job.model, job.axes, job.run(progress=self.relay.progressed.emit)

        self.go.enabled, self.stop.enabled = False, True
        self.bar.value = 0
        self.status.value = f"predicting {source} ..."
        self.worker = common.start(self, work, lambda out: self._done(source, scale, translate, *out), self._failed, self._finished)

    def cancel(self, *_) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status.value = "cancelling ..."

    def _progressed(self, done: int, total: int) -> None:
        if not common.alive(self):  # the viewer was closed: stop
            if self.job is not None:
                self.job.cancel()
            return
        self.bar.max = max(1, total)
        self.bar.value = min(done, total)

    def _done(self, source: str, scale, translate, model, axes: str, result: dict[str, Any]) -> None:
        self._show_thresholds(model)
        for data, meta, kind in result_layers(result, source, axes, model, scale, translate):
            getattr(self.viewer, f"add_{kind}")(data, **meta)
        said = [f"{source}: done"]
        if "T" in axes:
            frames = self.job.image.shape[axes.index("T")] if self.job is not None else None
            said.append(f"as {axes}{f' ({frames} frames)' if frames else ''}")
        objects = result.get("objects")
        if isinstance(objects, np.ndarray):
            said.append(f"{len(objects)} objects")
        if self.has_thresholds:
            said.append(f"thresholds {self.prob.value:.2f} / {self.nms.value:.2f}")
        fit = result.get("fit")
        if fit is not None and not fit.get("fits", True):
            self.say("warning", ", ".join(said) + f"; unlike the training data ({fit.get('reason')}): check the "
                                                  "outputs before trusting them")
        else:
            self.status.value = ", ".join(said)

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self.status.value = "cancelled: nothing was added"
        else:
            self.say("error", common.message(exc))

    def _finished(self) -> None:
        self.worker = None
        self.job = None
        self.go.enabled, self.stop.enabled = True, False
