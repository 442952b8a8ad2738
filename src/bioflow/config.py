"""The shape of a training config, and its validation before anything expensive happens.

Hydra composes the config from ``configs/`` (shipped as the package ``bioflow.configs``) and from
the config packages that plugins register (entry-point group ``bioflow.configs``). The composed
config is then checked here: every key must be known, every value of the right type, and every
component (registry name plus keyword arguments) must exist and accept its arguments. Errors name
the config key path, e.g. ``model.dept: architecture 'unet' has no argument 'dept'; did you mean
'depth'?``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from bioflow.arguments import describe_type, matches_type
from bioflow.errors import ConfigError

CONFIG_PACKAGE = "bioflow.configs"
PRIMARY_CONFIG = "train"


class Component(dict):
    """Marker type: a config section holding a registry ``name`` plus keyword arguments."""


@dataclass
class Split:
    val: float = 0.2
    test: float = 0.2
    seed: int = 0


@dataclass
class Normalize:
    low: float = 1.0
    high: float = 99.8


@dataclass
class Data:
    source: Component
    split: Split
    patch_size: list[int]
    patches_per_epoch: int
    batch_size: int
    num_workers: int
    normalize: Normalize
    augment: Optional[dict[str, Optional[dict[str, Any]]]] = None
    allow_empty_masks: bool = False
    min_foreground: float = 0.0


@dataclass
class Figures:
    every_n_epochs: int = 1
    n_samples: int = 3


@dataclass
class Logger:
    tracking_uri: Optional[str]
    experiment_name: str
    run_name: Optional[str]
    tags: dict[str, Any]
    figures: Figures


@dataclass
class Predict:
    tile_size: Optional[list[int]]
    overlap: Optional[list[int]]
    batch_size: int


@dataclass
class Checkpoint:
    save_top_k: int = 1


@dataclass
class TrainConfig:
    seed: int
    project_dir: str
    test_after_training: bool
    resume: Any
    task: Component
    data: Data
    model: Component
    loss: Component
    sampler: Component
    optimizer: Component
    scheduler: Component
    trainer: dict[str, Any]
    logger: Logger
    predict: Predict
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    postprocessor: Optional[Component] = None
    batch_transform: Optional[Component] = None


#: Trainer arguments bioflow sets itself.
RESERVED_TRAINER_KEYS = ("logger", "callbacks", "default_root_dir", "use_distributed_sampler", "enable_checkpointing")


def component(section: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A component section of the config as (registry name, keyword arguments)."""
    kwargs = dict(section)
    return kwargs.pop("name"), kwargs


def _check(value: Any, annotation: Any, path: str) -> None:
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of settings, got {value!r}")
        hints = typing.get_type_hints(annotation)
        fields = {f.name: f for f in dataclasses.fields(annotation)}
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                prefix = f"{path}." if path else ""
                raise ConfigError(f"{prefix}{key}: unknown config key{hint}")
        for name, f in fields.items():
            sub = f"{path}.{name}" if path else name
            if name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                    raise ConfigError(f"{sub}: missing from the config")
                continue
            _check(value[name], hints[name], sub)
        return
    if typing.get_origin(annotation) is typing.Union and value is not None:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1 and (inner[0] is Component or dataclasses.is_dataclass(inner[0])):
            _check(value, inner[0], path)
            return
    if annotation is Component:
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
            raise ConfigError(f"{path}: expected a component (a mapping with a 'name' key), got {value!r}")
        return
    if not matches_type(value, annotation):
        raise ConfigError(f"{path}: expected {describe_type(annotation)}, got {value!r}")


def validate_structure(config: Mapping[str, Any]) -> None:
    """Check keys and value types of a resolved config against :class:`TrainConfig`."""
    _check(config, TrainConfig, "")
    for key in config["trainer"]:
        if key in RESERVED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key}: set by bioflow itself; remove it from the config")
    if any(v is not None and v < 1 for v in (config["data"]["batch_size"], config["data"]["patches_per_epoch"])):
        raise ConfigError("data.batch_size and data.patches_per_epoch must be at least 1")


def validate_components(config: Mapping[str, Any]) -> None:
    """Resolve every component and check its arguments (imports the components' modules)."""
    import lightning as L

    from bioflow.arguments import check_arguments
    from bioflow.optim import check_optimization
    from bioflow.registry import SINGULAR, registry
    from bioflow.tasks import get_task

    task_name, settings = component(config["task"])
    task_cls = get_task(task_name)
    for key, value in settings.items():
        if key not in task_cls.settings:
            close = difflib.get_close_matches(key, list(task_cls.settings), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"task.{key}: task '{task_name}' has no setting '{key}'{hint}")
    provided = {
        "model": ("architectures", frozenset({"in_channels", "out_channels", "spatial_dims"})),
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
    check_arguments(registry.load("datasets", name), kwargs, where="data.source", label=f"dataset '{name}'")
    check_arguments(L.Trainer, config["trainer"], where="trainer", label="the Lightning Trainer")
    check_optimization(config)


def validate(config: Mapping[str, Any]) -> None:
    """Full validation of a resolved training config; raises :class:`ConfigError`."""
    validate_structure(config)
    validate_components(config)
