"""The widgets' work, without Qt: predicting a layer and training from layers, both with progress,
stopping and cancelling. The widgets run these in worker threads; the tests call them directly.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bioflow.errors import BioflowError


class Cancelled(BioflowError):
    """The user cancelled: nothing is kept."""


# -- prediction ---------------------------------------------------------------------------------
def thresholds_of(task) -> tuple[float, float] | None:
    """A StarDist model's (probability, overlap) thresholds; None for models without them."""
    values = getattr(task, "thresholds", None)
    if values is None or getattr(values, "numel", lambda: 0)() != 2:
        return None
    return float(values[0]), float(values[1])


@contextlib.contextmanager
def using_thresholds(task, thresholds: tuple[float, float] | None):
    """Predict with other StarDist thresholds, restoring the model's own afterwards."""
    own = thresholds_of(task)
    if thresholds is None or own is None:
        yield
        return
    import torch

    task.thresholds.copy_(torch.tensor([float(t) for t in thresholds]))
    try:
        yield
    finally:
        task.thresholds.copy_(torch.tensor(own))


class PredictionJob:
    """One image predicted by a model, cancellable between batches of tiles."""

    def __init__(self, model, image: np.ndarray, axes: str, options: dict[str, Any] | None = None,
                 thresholds: tuple[float, float] | None = None) -> None:
        self.model, self.image, self.axes = model, image, axes
        self.options = dict(options or {})
        self.thresholds = thresholds
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def run(self, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """The model's outputs (``Model.predict``); raises :class:`Cancelled` when cancelled."""
        def report(done: int, total: int) -> None:
            if self._cancel.is_set():
                raise Cancelled("prediction cancelled")
            if progress is not None:
                progress(done, total)

        report(0, 0)  # cancelled while the model was loading
        with using_thresholds(self.model.task, self.thresholds):
            result = self.model.predict(self.image, axes=self.axes, progress=report, **self.options)
        if self._cancel.is_set():  # cancelled after the last tile: still nothing is kept
            raise Cancelled("prediction cancelled")
        return result


# -- training -----------------------------------------------------------------------------------
def training_monitor(job: "TrainingJob"):
    """A Lightning callback that reports the loss and the validation metrics to ``job`` and
    obeys its stop and cancel requests."""
    from lightning.pytorch.callbacks import Callback

    class Monitor(Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            job.run_id = getattr(trainer.logger, "run_id", None)
            job.check(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None:
                job.emit("loss", trainer.global_step, float(loss))
            job.check(trainer)

        def on_validation_end(self, trainer, pl_module) -> None:  # after the task logged its metrics
            if trainer.sanity_checking:
                return
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                       if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
            job.emit("validation", trainer.current_epoch + 1, metrics)  # epochs counted from 1, as printed
            job.check(trainer)

        def on_test_batch_end(self, trainer, *args) -> None:
            job.check(trainer)

    return Monitor()


class TrainingJob:
    """A training run from overrides, as ``bioflow train`` runs it, with live reports.

    ``stop()`` ends training early (at the next step, after one more validation) and keeps the
    best checkpoint: the run is finished, tested and recorded. ``cancel()`` discards the run: its
    MLflow record (deleted), its checkpoints and ``discard`` (e.g. the layers written for it).
    """

    def __init__(self, overrides: Sequence[str], project_dir: str | Path, discard: Sequence[Path] = (),
                 on_event: Callable[[str, int, Any], None] | None = None) -> None:
        self.project_dir = Path(project_dir).expanduser().resolve()
        self.overrides = [*overrides, f"project_dir={self.project_dir}"]
        self.discard = [Path(p) for p in discard]
        self.on_event = on_event
        self.run_id: str | None = None
        self.history: dict[str, list] = {"loss": [], "validation": []}
        self._stop = threading.Event()
        self._cancel = threading.Event()
        now = datetime.datetime.now()
        self.job_dir = self.project_dir / "outputs" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")

    def stop(self) -> None:
        self._stop.set()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def emit(self, kind: str, step: int, value: Any) -> None:
        self.history[kind].append((step, value))
        if self.on_event is not None:
            self.on_event(kind, step, value)

    def check(self, trainer) -> None:
        if self._cancel.is_set():
            raise Cancelled("training cancelled")
        if self._stop.is_set() and not trainer.should_stop:
            trainer.should_stop = True

    def run(self) -> dict[str, Any]:
        """Train; the job summary of ``bioflow.train``. Raises :class:`Cancelled` after cleaning up."""
        from bioflow.api import train

        try:
            if self._cancel.is_set():
                raise Cancelled("training cancelled")
            return train(self.overrides, job_dir=self.job_dir, callbacks=[training_monitor(self)])
        except Cancelled:
            self.clean_up()
            raise
        except BaseException:
            if self._cancel.is_set():
                self.clean_up()
                raise Cancelled("training cancelled") from None
            if self.run_id is None:  # refused before it began: the files written for it go too
                for folder in self.discard:
                    shutil.rmtree(folder, ignore_errors=True)
            raise

    def clean_up(self) -> None:
        """Remove what a cancelled run made: its MLflow run, its artifacts and its folders."""
        if self.run_id is not None:
            delete_run(self.project_dir, self.overrides, self.run_id)
        for folder in [self.job_dir, *self.discard]:
            shutil.rmtree(folder, ignore_errors=True)


def delete_run(project_dir: Path, overrides: Sequence[str], run_id: str) -> None:
    """Remove a run for good: from the store (not only marked deleted, where the store allows it)
    and its artifacts from the embedded store's folder."""
    from urllib.parse import unquote, urlparse

    from mlflow.tracking import MlflowClient

    from bioflow.tracking.store import Store

    uri = next((o.split("=", 1)[1] for o in overrides if o.startswith("logger.tracking_uri=")), None)
    client = MlflowClient(Store.create(project_dir, uri or None).tracking_uri)
    artifacts = client.get_run(run_id).info.artifact_uri
    client.delete_run(run_id)
    backend = getattr(client, "_tracking_client", None)
    hard_delete = getattr(getattr(backend, "store", None), "_hard_delete_run", None)
    if hard_delete is not None:  # a database store: what `mlflow gc` does
        hard_delete(run_id)
    parsed = urlparse(artifacts or "")
    if parsed.scheme == "file":
        folder = Path(unquote(parsed.path))
        if folder.name == "artifacts" and folder.parent.name == run_id:
            folder = folder.parent  # <experiment>/<run id>/artifacts: the run's whole folder
        shutil.rmtree(folder, ignore_errors=True)
