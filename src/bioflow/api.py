"""bioflow from Python (notebooks, scripts): the same jobs as the command line, the same checks.

>>> import bioflow
>>> summary = bioflow.train(["experiment=demo_unet", "trainer.max_epochs=1"])   # doctest: +SKIP
>>> summary["test"]["test/dice_nucleus"]                                      # doctest: +SKIP

Every function validates its inputs exactly like the corresponding ``bioflow`` command and raises
:class:`bioflow.errors.BioflowError` (one-line message) on bad input.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence


def _as_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        import json

        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return [str(o) for o in overrides]


def train(overrides: Sequence[str] | Mapping[str, Any] | None = None, *, job_dir: str | Path | None = None,
          callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train (and test) a model from config overrides, as ``bioflow train`` does; tracked in MLflow.

    Parameters
    ----------
    overrides
        Hydra overrides, e.g. ``["experiment=demo_stardist", "trainer.max_epochs=2"]``, or a mapping
        ``{"experiment": "demo_stardist", "trainer.max_epochs": 2}``.
    job_dir
        Folder for this job's checkpoints and logs (default: ``<project_dir>/outputs/<date>/<time>``).
    callbacks
        More Lightning callbacks for the trainer (live curves, a stop button: setting
        ``trainer.should_stop`` ends training early and keeps the best checkpoint).

    Returns
    -------
    dict
        The job summary: ``run_id``, ``experiment``, ``tracking_uri``, ``best_checkpoint``,
        ``best_score``, ``test`` (test-split metrics), ``after_fit`` (e.g. StarDist thresholds),
        ``output_dir``, ``predict`` and ``dashboard`` (commands), ``performance``.
    """
    from bioflow.config import compose
    from bioflow.errors import BioflowError
    from bioflow.training.validation import validate
    from bioflow.training.job import run_training

    overrides = _as_overrides(overrides)
    config = compose(overrides)
    validate(config)
    if job_dir is None:
        now = datetime.datetime.now()
        job_dir = Path(config["project_dir"]) / "outputs" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")
    job_dir = Path(job_dir).expanduser().resolve()
    created = [p for p in (job_dir, *job_dir.parents) if not p.exists()]  # deepest first
    job_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run_training(config, job_dir, overrides, callbacks=callbacks)
    except BioflowError:  # bad data or settings: leave no empty folders behind, as the CLI does
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def predict(model: str, inputs: str | Path | Sequence[str | Path], out: str | Path, **options: Any) -> list[dict[str, Path]]:
    """Predict TIFF files with a trained model, as ``bioflow predict`` does (tiled, any size).

    Parameters
    ----------
    model
        An MLflow run id (found in the store it was trained into), a checkpoint file or a
        bioimage.io package (.zip, rdf.yaml or its folder).
    inputs
        TIFF files or folders of them.
    out
        Output folder (created when there is something to write; inputs are never overwritten).
    **options
        ``project_dir``, ``tracking_uri``, ``record`` (False: no MLflow record of the job), and
        the prediction options of ``bioflow predict``
        (:class:`bioflow.inference.options.PredictionOptions`: ``axes``, ``tile_size``, ``overlap``,
        ``batch_size``, ``tta``, ``blend``, ``rescale``, ``device``, ``precision``, ``overwrite``,
        ``progress``, ``out_format``, ``level``, ``block_size``), checked before any work. Inputs
        are TIFF files, OME-Zarr stores or folders of them (see docs/scale.md).

    Returns
    -------
    list of dict
        For each input, its output files by output name (``labels``, ``restored``, ...).
    """
    from bioflow.prediction import predict as predict_files

    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    options.setdefault("progress", False)
    return predict_files(model, [str(i) for i in items], str(out), **options)


class Model:
    """A trained model loaded for use in Python: ``model.predict(array)`` on numpy arrays.

    Attributes
    ----------
    task
        The bioflow task (a LightningModule) with its network, in eval mode.
    run_id
        The MLflow run it was trained in, when known.
    outputs
        Names of what :meth:`predict` returns, the main result first.
    """

    def __init__(self, loaded) -> None:
        self.task = loaded.task
        self.run_id = loaded.run_id
        self.checkpoint = loaded.checkpoint
        self.outputs = [spec.name for spec in self.task.prediction_outputs()]

    def __repr__(self) -> str:
        info = self.task.data_info
        config = getattr(self.task, "config", None)  # None: a bioimage.io package of another tool
        kind = config["task"]["name"] if config else "bioimage.io package"
        return f"bioflow.Model(task={kind!r}, {info.spatial_dims}D, {info.in_channels} channel(s), run_id={self.run_id!r})"

    def predict(self, image, axes: str | None = None, **options: Any) -> dict[str, Any]:
        """Predict one image (or every time point of a time-lapse) held in memory.

        Parameters
        ----------
        image
            A numpy array (or anything numpy reads).
        axes
            Its axes, e.g. ``"YX"``, ``"CYX"``, ``"YXC"``, ``"ZYX"``, ``"TYX"``. Default: the image's
            spatial axes (``YX`` / ``ZYX``), with a leading channel axis if it has one more.
        **options
            The tiler's options of ``bioflow predict``: ``tile_size``, ``overlap``, ``batch_size``,
            ``tta``, ``blend`` (:class:`bioflow.inference.options.PredictionOptions`),
            ``tta_spread=True`` for the spread between the augmented predictions (``"tta_spread"``,
            per pixel; implies ``tta``), and ``confidence=True`` for a segmentation model's
            per-pixel confidence map.

        Returns
        -------
        dict
            Output name -> array: label images ``([T], [Z], Y, X)``, restored images
            ``([T], C, [Z], Y, X)``; a ``T`` axis first when ``axes`` has one. Tables (StarDist's
            ``objects``: label, probability, area or volume, centroid) are numpy structured
            arrays, a list of them (one per frame) for a time-lapse. ``fit``, for models bioflow
            trained: how the (first) image fits the training data (``score``, ``threshold``,
            ``fits``, ``reason``), as ``bioflow predict``'s ``fit_report.csv`` has it.
        """
        import dataclasses

        import numpy as np

        from bioflow.data.tiff import layout_plan
        from bioflow.data.views import channel_indices
        from bioflow.errors import DataError
        from bioflow.inference.options import TILING, PredictionOptions
        from bioflow.prediction import predict_array, request_outputs

        checked = PredictionOptions.of(allowed=(*TILING, "confidence"), **{"progress": False, **options})
        request_outputs(self.task, checked)
        checked = dataclasses.replace(checked, confidence=False)  # asked of the task, not of the tiler
        array = np.asarray(image)
        dims = self.task.data_info.spatial_dims
        if axes is None:
            spatial = "ZYX"[-dims:]
            if array.ndim == dims:
                axes = spatial
            elif array.ndim == dims + 1:
                axes = "C" + spatial
            else:
                raise DataError(f"an image of shape {array.shape} for a {dims}D model: give its axes (e.g. axes='TYX')")
        axes = axes.upper()
        frames = [array] if "T" not in axes else [np.take(array, t, axis=axes.index("T")) for t in range(array.shape[axes.index("T")])]
        frame_axes = axes.replace("T", "")
        wanted = getattr(self.task, "channel_selection", None)  # packages of other tools choose none
        results: list[dict[str, Any]] = []
        for frame in frames:
            take, add_channel = layout_plan(frame_axes, frame.shape, Path("the image"), want_channels=True)
            kept = [i for i, pos in enumerate(take) if pos is not None]
            squeezed = frame.squeeze(axis=tuple(i for i, pos in enumerate(take) if pos is None))
            laid = np.transpose(squeezed, sorted(range(len(kept)), key=lambda j: take[kept[j]]))
            laid = laid[None] if add_channel else laid
            if wanted:  # data.channels, as for files: the channels the model was trained on
                laid = laid[channel_indices(wanted, laid.shape[0], None, "the image")]
            results.append(predict_array(self.task, laid, checked, check_fit=not results))
        verdict = results[0].pop("fit", None)  # how the (first) image fits the training data
        if verdict is not None:
            for r in results:
                r["fit"] = verdict
        if "T" not in axes:
            return results[0]
        tables = {spec.name for spec in self.task.prediction_outputs() if spec.table}
        return {name: [r[name] for r in results] if name in tables else
                results[0][name] if name == "fit" else np.stack([r[name] for r in results]) for name in results[0]}


def load_model(model: str, *, project_dir: str | Path | None = None, tracking_uri: str | None = None,
               device: str = "auto") -> Model:
    """Load a trained model (an MLflow run id, a checkpoint file or a bioimage.io package) for
    prediction in Python, found as ``bioflow predict`` finds it.

    Only what prediction needs is loaded (a missing training-only plugin, such as a loss, is not
    required). ``device``: ``auto`` (a GPU if there is one), ``cpu``, ``cuda``, ``cuda:1``, ...
    """
    from bioflow.loading import load_model as load
    from bioflow.prediction import choose_device
    from bioflow.tracking.store import Store, default_project_dir

    explicit = project_dir is not None or tracking_uri is not None
    store = Store.create(project_dir or default_project_dir(), tracking_uri).check_intact()
    loaded = load(str(model), store, inference=True, explicit_store=explicit)
    loaded.task.to(choose_device(device, option="device"))
    return Model(loaded)


def evaluate(model: str, split: str = "test", **options: Any) -> dict[str, Any]:
    """Metrics of a trained model on a split of its own data, as ``bioflow evaluate`` (logged into
    its run unless ``log_to_run=False``). Options: ``project_dir``, ``tracking_uri``, ``log_to_run``.
    Returns ``metrics``, ``n_images``, ``run_id`` and whether they were ``logged``."""
    from bioflow.evaluation import evaluate as evaluate_model

    return evaluate_model(str(model), split=split, **options)
