"""The training job: config -> data -> task -> Lightning Trainer -> MLflow run -> test figures."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from bioflow.config import component
from bioflow.training.validation import validate
from bioflow.errors import ConfigError
from bioflow.quiet import quiet_dependencies
from bioflow.allocator import keep_freed_memory
from bioflow.threads import chosen_threads, fit_threads, local_processes
from bioflow.precision import resolve_precision
from bioflow.data.module import BioflowDataModule
from bioflow.training.resume import find_resume_point, requested_resume, resumed_config
from bioflow.tasks import create_task, get_task, settings_of
from bioflow.tasks.base import used_components
from bioflow.tracking.run import (
    ValidationFigures, log_checkpoint, log_run_start, make_logger, mark_resumed, publish_runs_view, runs_page,
)
from bioflow.tracking.store import Store

log = logging.getLogger(__name__)


class EpochReport(Callback):
    """One log line per epoch with the losses and the monitored score (readable in job logs)."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor

    @rank_zero_only
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        shown = [k for k in dict.fromkeys(("train/loss", "val/loss", self.monitor)) if k in metrics]
        values = ", ".join(f"{k}={float(metrics[k]):.4f}" for k in shown)
        log.info("epoch %d/%s: %s", trainer.current_epoch + 1, trainer.max_epochs, values)


class TrainingSpeed(Callback):
    """Seconds per training step and patches per second, data loading included and validation
    excluded; logged per epoch (``perf/seconds_per_step``, ``perf/patches_per_second``)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self.patches = 0
        self._start = self._last = 0.0
        self._epoch = (0, 0)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.perf_counter()
        self._epoch = (0, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last = time.perf_counter()
        self._epoch = (self._epoch[0] + 1, self._epoch[1] + int(batch["image"].shape[0]))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        steps, patches = self._epoch
        seconds = self._last - self._start
        if steps:
            self.seconds, self.steps, self.patches = self.seconds + seconds, self.steps + steps, self.patches + patches
            pl_module.log("perf/seconds_per_step", seconds / steps, rank_zero_only=True)
            pl_module.log("perf/patches_per_second", patches / max(seconds, 1e-9), rank_zero_only=True)

    def summary(self) -> dict[str, float]:
        if not self.steps:
            return {}
        return {"train_seconds": self.seconds, "steps": self.steps,
                "seconds_per_step": self.seconds / self.steps, "patches_per_second": self.patches / max(self.seconds, 1e-9)}


def scale_check(task, data: BioflowDataModule) -> dict[str, str]:
    """Compare the typical object size of the training labels with the receptive field.

    Returns the tags to record; logs a warning when the typical object is larger than what one
    output pixel of the network can see.
    """
    from bioflow.data.objects import object_size_summary

    rf = task.receptive_field()
    tags = {"bioflow.receptive_field_px": str(rf)}
    if task.target_kind != "mask":
        return tags
    instances = task.task_settings.get("target", "binary") != "classes"
    summary = object_size_summary(data.splits["train"], instances)
    if summary is None:
        return tags
    tags["bioflow.object_size_median_px"] = f"{summary['median']:g}"
    tags["bioflow.object_size_p90_px"] = f"{summary['p90']:g}"
    if summary["median"] > rf:
        tags["bioflow.warning.objects_exceed_receptive_field"] = "true"
        log.warning(
            "typical object in the training labels spans %g pixels (90%% of objects up to %g) but the network's "
            "receptive field is %d pixels: objects larger than what the network sees are segmented from local "
            "texture only; use a deeper network (model.depth) or downscale the images",
            summary["median"], summary["p90"], rf,
        )
    return tags


@rank_zero_only
def remember_store(store: Store) -> None:
    store.remember()


@rank_zero_only
def log_scale_check(logger, task, data: BioflowDataModule) -> None:
    for key, value in scale_check(task, data).items():
        logger.experiment.set_tag(logger.run_id, key, value)


def with_absolute_paths(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with the project folder and the data source's path arguments made absolute."""
    from bioflow.arguments import absolute_path_arguments
    from bioflow.registry import registry

    config = dict(config)
    config["project_dir"] = str(Path(config["project_dir"]).expanduser().resolve())
    name, kwargs = component(config["data"]["source"])
    factory = registry.load("sources", name)
    config["data"] = {**config["data"], "source": {"name": name, **absolute_path_arguments(factory, kwargs, Path.cwd())}}
    split = dict(config["data"]["split"])
    for key in ("train", "val", "test"):
        if isinstance(split.get(key), (list, tuple)):  # listed files and folders, as absolute paths
            split[key] = [str(Path(e).expanduser().resolve()) if Path(e).expanduser().exists() else e for e in split[key]]
    config["data"]["split"] = split
    return config


def run_training(config: Mapping[str, Any], run_dir: Path, overrides: list[str] | None = None,
                 callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train (and test) as the resolved ``config`` says; return a summary of the job.

    Parameters
    ----------
    config
        The resolved config as plain containers (validated here again).
    run_dir
        This job's output folder (Hydra's run directory).
    overrides
        The overrides the user gave (to check what a resumed run can take from them).
    callbacks
        More Lightning callbacks (e.g. a viewer's live curves, or its stop button through
        ``trainer.should_stop``), after bioflow's own.
    """
    validate(config)
    quiet_dependencies()
    config = with_absolute_paths(config)
    store = Store.create(config["project_dir"], config["logger"]["tracking_uri"]).check_intact()
    store.check_reachable()
    request = requested_resume(config)
    resume = None
    if request is not None:
        resume = find_resume_point(request, store, config["logger"]["experiment_name"])
        # the run's own config (so the resumed job ends where the uninterrupted one would), with
        # more epochs or steps if asked; other overrides are refused
        config = resumed_config(resume, config, overrides or [])
        run_dir = resume.output_dir
        log.info("resuming run %s from %s", resume.run_id, resume.checkpoint)
    L.seed_everything(config["seed"], workers=True, verbose=False)

    task_cls = get_task(config["task"]["name"])
    data = BioflowDataModule(
        config["data"], config["sampler"], seed=config["seed"], target_kind=task_cls.target_kind,
        task_name=config["task"]["name"],
    )
    data.read()
    settings = settings_of(task_cls, config["task"])
    found = task_cls.settings_from_data(settings, data.records)
    if found:  # e.g. the classes counted in the masks: recorded with the run like given settings
        log.info("task: %s (not set: %s)", ", ".join(f"{k}={v}" for k, v in found.items()),
                 "from the data and the defaults")
        config = {**config, "task": {**config["task"], **found}}
        settings.update(found)
    data.target_fn = task_cls.target_transform(settings)
    data.prepare()
    data_info = {
        "in_channels": data.in_channels,
        "spatial_dims": data.spatial_dims,
        "pixel_size": data.pixel_size,
        "split": data.split,
        "normalization": data.normalizer.as_dict(),
    }
    task = create_task(config, data_info)
    data.loader_target = task.loader_loss_target()
    check_patch_size(config["data"]["patch_size"], task.size_multiple)
    has_val = bool(data.splits["val"])
    if not has_val and component(config["scheduler"])[0] == "plateau":
        raise ConfigError("scheduler=plateau: lowers the rate when validation stops improving, but there are no "
                          "validation images; choose another scheduler or hold out validation images (data.split.val)")
    if resume is None and config.get("init_from"):
        init_weights(task, config["init_from"], store)

    store.prepare()  # only now: bad data must not leave an empty store behind
    if resume is None:
        logger = make_logger(config["logger"], store)
        log_run_start(logger, config, used_components(config), data.split, run_dir)
        log_scale_check(logger, task, data)
        remember_store(store)
        if config.get("init_from"):
            set_tag(logger, "bioflow.init_from", str(config["init_from"]))
    else:
        logger = make_logger(config["logger"], store, run_id=resume.run_id, resuming=True)
        mark_resumed(logger)
    if not has_val:
        log.warning("no validation images: the weights of the last epoch are kept as the model")
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best-{epoch:03d}" if has_val else "final-{epoch:03d}",
        monitor=task.monitor if has_val else None, mode=task.monitor_mode,
        save_top_k=config["checkpoint"]["save_top_k"] if has_val else 1, save_last=True,
    )
    speed = TrainingSpeed()
    callbacks = [
        checkpoint, ValidationFigures(config["logger"]["figures"]["every_n_epochs"]), LearningRateMonitor(),
        EpochReport(task.monitor), speed, *callbacks,
    ]
    trainer_args = resolve_precision(config["trainer"])
    processes = local_processes()
    if processes == 1 and str(trainer_args.get("strategy", "")).startswith("ddp") and isinstance(trainer_args.get("devices"), int):
        processes = int(trainer_args["devices"])  # Lightning starts the others on this node
    threads, why = chosen_threads(int(config["data"]["num_workers"]), processes)
    fit_threads(int(config["data"]["num_workers"]), processes)
    keep_freed_memory()  # every step reuses the last one's memory (see bioflow.allocator)
    log.info("threads: %d per process (%s)", threads, why)
    trainer_args.setdefault("enable_model_summary", False)  # bioflow's own line instead of Lightning's table
    steps = max(1, -(-int(config["data"]["patches_per_epoch"]) // int(config["data"]["batch_size"])))
    if int(trainer_args.get("log_every_n_steps", 50)) > steps:  # shorter epochs: log the loss within each
        trainer_args["log_every_n_steps"] = steps
    if not trainer_args["enable_model_summary"]:
        parameters = sum(p.numel() for p in task.parameters())
        log.info("model: %s, %s parameters", type(task.model).__name__ if hasattr(task, "model") else type(task).__name__,
                 f"{parameters / 1e6:.2f} M" if parameters >= 1e6 else f"{parameters / 1e3:.0f} K")
    if not has_val:
        trainer_args.update(limit_val_batches=0, num_sanity_val_steps=0)
    trainer = L.Trainer(
        **trainer_args, logger=logger, callbacks=callbacks, default_root_dir=run_dir, use_distributed_sampler=False,
    )
    set_tag(logger, "bioflow.precision", str(trainer_args.get("precision")))  # what `auto` became here
    trainer.fit(task, datamodule=data, ckpt_path=None if resume is None else str(resume.checkpoint))
    summary: dict[str, Any] = {
        "run_id": logger.run_id,
        "experiment": config["logger"]["experiment_name"],
        "tracking_uri": store.tracking_uri,
        "best_checkpoint": checkpoint.best_model_path,
        "best_score": None if checkpoint.best_model_score is None else float(checkpoint.best_model_score),
        "output_dir": str(run_dir),
        "dashboard": store.dashboard_command(),
        "dashboard_page": runs_page(store.dashboard_url(), logger.experiment_id),
        "predict": store.predict_command(logger.run_id),
        "is_global_zero": trainer.is_global_zero,
        "performance": speed.summary(),
        "test": {},
    }
    if checkpoint.best_model_path:
        summary["after_fit"] = finish_best_checkpoint(task, data, trainer, logger, checkpoint.best_model_path)
    if config["test_after_training"] and checkpoint.best_model_path and not data.splits["test"]:
        log.info("no test images: nothing to test (hold out images with data.split.test to measure the model)")
    elif config["test_after_training"] and checkpoint.best_model_path:
        results = trainer.test(task, datamodule=data, ckpt_path=checkpoint.best_model_path, verbose=False)
        summary["test"] = {k: float(v) for k, v in (results[0] if results else {}).items()}
        log_figures(logger, task.report_figures, summary["test"])
        publish_runs_view(logger, [k for k in task.headline_metrics if k in summary["test"]] + ["test/loss"])
    end_distributed()
    return summary


def check_patch_size(patch_size, multiple: int) -> None:
    """Training patches must fit the network's size multiple (its poolings)."""
    if any(int(p) % multiple for p in patch_size):
        fits = [max(multiple, int(p) // multiple * multiple) for p in patch_size]
        raise ConfigError(f"data.patch_size: {list(patch_size)} is not a multiple of {multiple}, which this network "
                          f"needs (its poolings); use e.g. {fits}")


def init_weights(task, source: str, store: Store) -> None:
    """Start from the network weights of another model (fine-tuning): a checkpoint or a run id.

    The network must be the same (architecture and its settings, channels, task outputs); a
    mismatch is a one-line error naming the first weights that differ.
    """
    from bioflow.loading import fetch_checkpoint

    checkpoint = fetch_checkpoint(str(source), store, explicit_store=False).checkpoint
    # models saved before the network was called ``model`` hold it under ``net.``
    weights = {("model." + k[4:] if k.startswith("net.") else k): v for k, v in checkpoint["state_dict"].items()}
    weights = {k: v for k, v in weights.items() if k.startswith("model.")}
    own = {k: v for k, v in task.state_dict().items() if k.startswith("model.")}
    missing = sorted(set(own) - set(weights))
    mismatched = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if not weights or missing or mismatched:
        key = (mismatched or missing or ["(no network weights)"])[0]
        detail = (f"{key} is {tuple(weights[key].shape)} there but {tuple(own[key].shape)} here" if mismatched
                  else f"{key} is missing there")
        raise ConfigError(
            f"init_from={source}: its network does not fit this config ({detail}); fine-tuning needs the same "
            "model, task settings and number of channels"
        )
    task.load_state_dict(weights, strict=False)
    log.info("network initialised from %s", source)


@rank_zero_only
def set_tag(logger, key: str, value: str) -> None:
    logger.experiment.set_tag(logger.run_id, key, value)


def end_distributed() -> None:
    """Close this job's process group, so that the next job of a sweep starts its own ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish_best_checkpoint(task, data, trainer, logger, path: str) -> dict[str, float]:
    """Run the task's after-training step on the best weights, store its result in the checkpoint, log it.

    Every rank runs the (deterministic) step on all validation images; rank 0 rewrites the file.
    """
    import torch

    from bioflow.inference.fit import fit_reference

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    task.load_state_dict(checkpoint["state_dict"])
    extras = task.after_fit(data)
    fit = fit_reference(task, data)  # the training data's fingerprint: does a later input fit it?
    if trainer.is_global_zero:
        if fit is not None:
            checkpoint.setdefault("bioflow", {})["fit"] = fit
        if extras or fit is not None:
            checkpoint["state_dict"] = {k: v.detach().cpu() for k, v in task.state_dict().items()}
            partial = f"{path}.partial"  # a kill mid-write must not ruin the best checkpoint
            torch.save(checkpoint, partial)
            os.replace(partial, path)
        if extras:
            log_values(logger, extras)
        log_checkpoint(logger, path)
    trainer.strategy.barrier()
    return extras


@rank_zero_only
def log_values(logger, values: Mapping[str, float]) -> None:
    """Numbers from after training: thresholds as params, scores as metrics."""
    for key, value in values.items():
        if "/" in key:
            logger.experiment.log_metric(logger.run_id, key, float(value))
        else:
            logger.experiment.log_param(logger.run_id, key, value)


@rank_zero_only
def log_figures(logger, make_figures, metrics: Mapping[str, float]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for path in make_figures(metrics, tmp):
            logger.experiment.log_artifact(logger.run_id, str(path), "evaluation")


def print_summary(summary: Mapping[str, Any], out=sys.stdout) -> None:
    """The lines a user reads at the end of a training job."""
    lines = ["", "bioflow: training finished"]
    if summary.get("after_fit"):
        lines.append("  chosen on the validation split: " + ", ".join(f"{k} = {v:.4g}" for k, v in summary["after_fit"].items()))
    if summary["test"]:
        shown = sorted(summary["test"])
        if len(shown) > 12:  # many thresholds (scores per IoU threshold): the headline ones here, all in the run
            import re

            shown = [k for k in shown if not re.search(r"_\d\.\d+$", k) or k.endswith(("_0.5", "_0.7"))]
            lines.append(f"  test split ({len(shown)} of {len(summary['test'])} metrics; all are in the run):")
        else:
            lines.append("  test split:")
        lines += [f"    {k} = {summary['test'][k]:.4f}" for k in shown]
    if summary["best_score"] is not None:
        lines.append(f"  best validation score: {summary['best_score']:.4f}")
    perf = summary.get("performance") or {}
    if perf:
        lines.append(f"  training speed: {perf['seconds_per_step']:.3f} s per step, {perf['patches_per_second']:.1f} patches/s "
                     f"({perf['steps']} steps, validation excluded)")
    lines += [
        f"  MLflow run: {summary['run_id']} (experiment '{summary['experiment']}')",
        f"  tracking store: {summary['tracking_uri']}",
        f"  best checkpoint: {summary['best_checkpoint']}",
        f"  job folder: {summary['output_dir']}",
        f"  dashboard: {summary['dashboard']}",
        f"    runs with their test scores: {summary['dashboard_page']}",
        f"  predict: {summary['predict']}",
    ]
    print("\n".join(lines), file=out, flush=True)
