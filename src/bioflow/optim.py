"""Optimizers and learning-rate schedules, chosen by name in the ``optimizer`` and ``scheduler`` sections."""

from __future__ import annotations

from typing import Any, Mapping

from bioflow.arguments import check_arguments
from bioflow.config import component
from bioflow.errors import ConfigError, check_range


def _optimizers() -> dict[str, Any]:
    import torch

    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}


def _schedulers() -> dict[str, Any]:
    import torch

    return {
        "none": None,
        "cosine": torch.optim.lr_scheduler.CosineAnnealingLR,
        "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau,
        "onecycle": torch.optim.lr_scheduler.OneCycleLR,
    }


# Arguments bioflow fills in for each scheduler.
_SCHEDULER_PROVIDED = {
    "cosine": {"optimizer", "T_max"},
    "plateau": {"optimizer", "mode"},
    "onecycle": {"optimizer", "max_lr", "total_steps", "epochs", "steps_per_epoch"},
}


def check_optimization(config: Mapping[str, Any]) -> None:
    """Check the ``optimizer`` and ``scheduler`` sections (names and arguments)."""
    name, kwargs = component(config["optimizer"])
    optimizers = _optimizers()
    if name.lower() not in optimizers:
        raise ConfigError(f"optimizer.name: unknown optimizer '{name}' (choose from {', '.join(optimizers)})")
    check_arguments(optimizers[name.lower()], kwargs, where="optimizer", label=f"optimizer '{name}'",
                    provided=frozenset({"params"}))
    if kwargs.get("lr") is not None:
        check_range("optimizer.lr", kwargs["lr"], low=0.0, low_open=True, allowed="a learning rate > 0")
    name, kwargs = component(config["scheduler"])
    schedulers = _schedulers()
    if name not in schedulers:
        raise ConfigError(f"scheduler.name: unknown scheduler '{name}' (choose from {', '.join(schedulers)})")
    if schedulers[name] is None:
        if kwargs:
            raise ConfigError(f"scheduler: scheduler 'none' takes no arguments, got {', '.join(kwargs)}")
        return
    given = _SCHEDULER_PROVIDED[name]
    for key in kwargs:
        if key in given:
            raise ConfigError(f"scheduler.{key}: set by bioflow; remove it")
    check_arguments(schedulers[name], kwargs, where="scheduler", label=f"scheduler '{name}'", provided=frozenset(given))


def configure_optimization(parameters, config: Mapping[str, Any], max_epochs: int | None, monitor: str, mode: str,
                           total_steps: int | None = None):
    """What ``LightningModule.configure_optimizers`` returns for this config.

    ``total_steps`` (optimizer steps of the whole run) is needed by the per-step ``onecycle`` schedule.
    """
    check_optimization(config)
    name, kwargs = component(config["optimizer"])
    optimizer = _optimizers()[name.lower()](parameters, **kwargs)
    sched_name, sched_kwargs = component(config["scheduler"])
    if sched_name == "none":
        return optimizer
    if sched_name == "onecycle":  # warm up to optimizer.lr, then anneal, step by step
        lr = optimizer.param_groups[0]["lr"]
        scheduler = _schedulers()["onecycle"](optimizer, max_lr=lr, total_steps=max(1, int(total_steps or 1)), **sched_kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    if sched_name == "cosine":
        epochs = max_epochs if max_epochs and max_epochs > 0 else 100
        scheduler = _schedulers()["cosine"](optimizer, T_max=epochs, **sched_kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
    scheduler = _schedulers()["plateau"](optimizer, mode=mode, **sched_kwargs)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": monitor, "interval": "epoch"}}
