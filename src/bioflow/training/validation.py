"""Validation of a whole training config before anything expensive happens: its structure (keys,
types, ranges; :mod:`bioflow.config`), every component it names (which must exist and accept
their arguments), and whether they fit the task and are used by it."""

from __future__ import annotations

from typing import Any, Mapping

from bioflow.config import component, section, validate_structure
from bioflow.errors import ConfigError
from bioflow.kinds import KINDS, loss_targets_taken
from bioflow.precision import resolve_precision


def validate_components(config: Mapping[str, Any]) -> None:
    """Resolve every component and check its arguments (imports the components' modules)."""
    import lightning as L

    from bioflow.arguments import check_arguments
    from bioflow.optim import check_optimization
    from bioflow.registry import registry
    from bioflow.tasks import get_task

    task_name, _ = component(config["task"])
    task_cls = get_task(task_name)
    for k in KINDS:  # every config section that names a component, with what bioflow gives it
        node = section(config, k.section) if k.section else None
        if node is None:
            continue
        name, kwargs = component(node)
        factory = task_cls if k.name == "tasks" else registry.load(k.name, name)
        check_arguments(factory, kwargs, where=k.section, label=f"{k.singular} '{name}'", provided=k.provided)
    check_arguments(L.Trainer, resolve_precision(config["trainer"]), where="trainer", label="the Lightning Trainer")
    check_optimization(config)
    check_compatibility(config, task_name, task_cls)


#: Loss targets in words, for messages (a plugin's own kinds of target are named as they are).
_TARGET_WORDS = {"classes": "class masks", "stardist": "StarDist targets", "image": "target images",
                 "masked_image": "blind-spot masked images"}


def _words(targets) -> str:
    return " or ".join(_TARGET_WORDS.get(t, t) for t in targets)


def _fitting(kind_name: str, fits) -> list[str]:
    """Names of the installed components of a kind for which ``fits(component)`` holds (those that
    fail to load are left out: this only makes a suggestion)."""
    from bioflow.errors import RegistryError
    from bioflow.registry import registry

    found = []
    for comp in registry.components(kind_name):
        try:
            if fits(registry.load(kind_name, comp.qualified_name)):
                found.append(comp.name)
        except RegistryError:
            continue
    return sorted(set(found))


def check_compatibility(config: Mapping[str, Any], task_name: str, task_cls: Any) -> None:
    """Refuse components that do not fit the task, or that the task would not use; the message
    names what would fit, as the registry has it."""
    from bioflow.registry import registry

    loss_name, _ = component(config["loss"])
    takes = loss_targets_taken(registry.load("losses", loss_name))
    wanted = task_cls.bioflow_targets
    if not set(wanted) & set(takes):
        # likelihood losses are offered to probabilistic models only (task.probabilistic)
        probabilistic = bool(component(config["task"])[1].get("probabilistic"))
        fits = _fitting("losses", lambda loss: set(wanted) & set(loss_targets_taken(loss))
                        and (getattr(loss, "bioflow_distribution", None) is not None) == probabilistic)
        hint = (f"; use loss={fits[0]}" + (f" (losses for it: {', '.join(fits)})" if len(fits) > 1 else "")) if fits else ""
        raise ConfigError(f"loss={loss_name}: task '{task_name}' trains on {_words(wanted)}, this loss on {_words(takes)}{hint}")
    for name in ("batch_transform", "postprocessor"):
        node = config.get(name)
        if node is not None and name not in task_cls.uses:
            users = _fitting("tasks", lambda task: name in getattr(task, "uses", ()))
            who = f" (task {', '.join(repr(u) for u in users)} {'do' if len(users) > 1 else 'does'})" if users else ""
            raise ConfigError(
                f"{name}={node['name']}: task '{task_name}' does not use a {name.replace('_', ' ')}{who}; "
                f"remove it with {name}=null"
            )


def validate(config: Mapping[str, Any]) -> None:
    """Full validation of a resolved training config; raises :class:`ConfigError`."""
    validate_structure(config)
    validate_components(config)
