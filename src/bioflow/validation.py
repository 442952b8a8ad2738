"""Validation of a whole training config before anything expensive happens: its structure (keys,
types, ranges; :mod:`bioflow.config`), every component it names (which must exist and accept
their arguments), and whether they fit the task and are used by it."""

from __future__ import annotations

from typing import Any, Mapping

from bioflow.config import component, validate_structure
from bioflow.errors import ConfigError, did_you_mean
from bioflow.precision import resolve_precision


def validate_components(config: Mapping[str, Any]) -> None:
    """Resolve every component and check its arguments (imports the components' modules)."""
    import lightning as L

    from bioflow.arguments import check_arguments
    from bioflow.optim import check_optimization
    from bioflow.registry import SINGULAR, registry
    from bioflow.tasks import CONTEXT_ARGUMENTS, get_task

    task_name, settings = component(config["task"])
    task_cls = get_task(task_name)
    check_arguments(task_cls, settings, where="task", label=f"task '{task_name}'", provided=CONTEXT_ARGUMENTS)
    provided = {
        "model": ("models", frozenset({"in_channels", "out_channels", "spatial_dims"})),
        "loss": ("losses", frozenset()),
        "sampler": ("samplers", frozenset({"index", "num_samples", "seed"})),
    }
    if config.get("postprocessor") is not None:
        provided["postprocessor"] = ("postprocessors", frozenset())
    if config.get("batch_transform") is not None:
        provided["batch_transform"] = ("batch_transforms", frozenset())
    for path, (kind, given) in provided.items():
        name, kwargs = component(config[path])
        factory = registry.load(kind, name)
        check_arguments(factory, kwargs, where=path, label=f"{SINGULAR[kind]} '{name}'", provided=given)
    name, kwargs = component(config["data"]["source"])
    check_arguments(registry.load("sources", name), kwargs, where="data.source", label=f"data source '{name}'")
    check_arguments(L.Trainer, resolve_precision(config["trainer"]), where="trainer", label="the Lightning Trainer")
    check_optimization(config)
    check_compatibility(config, task_name, task_cls)


#: What a task's loss target is, in words, and losses that take it (for messages).
_LOSS_TARGETS = {
    "classes": ("class masks", "ce_dice, cross_entropy, dice, focal"),
    "stardist": ("StarDist targets", "stardist"),
    "image": ("target images", "mae, mse"),
    "masked_image": ("blind-spot masked images", "masked_mse"),
}


def check_compatibility(config: Mapping[str, Any], task_name: str, task_cls: Any) -> None:
    """Refuse components that do not fit the task, or that the task would not use."""
    from bioflow.registry import registry

    loss_name, _ = component(config["loss"])
    takes = tuple(getattr(registry.load("losses", loss_name), "bioflow_targets", ("classes",)))
    wanted = task_cls.loss_targets
    if wanted not in takes:
        what, fits = _LOSS_TARGETS.get(wanted, (wanted, ""))
        given = " or ".join(_LOSS_TARGETS.get(t, (t,))[0] for t in takes)
        hint = f"; use loss={fits.split(',')[0]}" + (f" (losses for it: {fits})" if "," in fits else "") if fits else ""
        raise ConfigError(f"loss={loss_name}: task '{task_name}' trains on {what}, this loss on {given}{hint}")
    for section in ("batch_transform", "postprocessor"):
        node = config.get(section)
        if node is not None and section not in task_cls.uses:
            users = {"batch_transform": "n2v", "postprocessor": "segmentation"}[section]
            raise ConfigError(
                f"{section}={node['name']}: task '{task_name}' does not use a {section.replace('_', ' ')} "
                f"(task '{users}' does); remove it with {section}=null"
            )


def validate(config: Mapping[str, Any]) -> None:
    """Full validation of a resolved training config; raises :class:`ConfigError`."""
    validate_structure(config)
    validate_components(config)
