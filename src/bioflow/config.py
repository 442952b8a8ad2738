"""The shape of a training config, and its validation before anything expensive happens.

Hydra composes the config from ``configs/`` (shipped as the package ``bioflow.configs``) and from
the config packages that plugins register (entry-point group ``bioflow.configs``). The composed
config is then checked here: every key must be known, every value of the right type, and every
component (registry name plus keyword arguments) must exist and accept its arguments. Errors name
the config key path, e.g. ``model.dept: model 'unet' has no argument 'dept'; did you mean
'depth'?``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence, Union

from bioflow.arguments import describe_type, matches_type
from bioflow.errors import ConfigError, check_range, did_you_mean
from bioflow.kinds import component_sections

CONFIG_PACKAGE = "bioflow.configs"
PRIMARY_CONFIG = "train"


class Component(dict):
    """Marker type: a config section holding a registry ``name`` plus keyword arguments."""


@dataclass
class Split:
    val: Union[float, list[str]] = 0.2
    test: Union[float, list[str]] = 0.2
    seed: int = 0
    train: Optional[list[str]] = None
    by: str = "image"


@dataclass
class Normalize:
    mode: str = "per_image"
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
    channels: Optional[list[Union[int, str]]] = None


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
    batch_size: Optional[int]
    precision: Literal["32-true", "bf16-mixed", "auto"] = "32-true"


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
    init_from: Optional[str] = None


#: Trainer arguments bioflow sets itself.
RESERVED_TRAINER_KEYS = ("logger", "callbacks", "default_root_dir", "use_distributed_sampler", "enable_checkpointing")


def component(section: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A component section of the config as (registry name, keyword arguments)."""
    kwargs = dict(section)
    return kwargs.pop("name"), kwargs


#: Config sections that name registry components, with their kinds (from :mod:`bioflow.kinds`).
COMPONENT_SECTIONS: dict[str, str] = component_sections()


def section(config: Mapping[str, Any], path: str) -> Mapping[str, Any] | None:
    """The config section at a dotted ``path``, or None if it is absent or null."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return None
        node = node[part]
    return node


def used_components(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Name, arguments, distribution and version of every component the config uses."""
    from bioflow.registry import registry

    out: dict[str, dict[str, Any]] = {}
    for path, kind in COMPONENT_SECTIONS.items():
        node = section(config, path)
        if node is None:
            continue
        name, kwargs = component(node)
        out[path] = {"kind": kind, "kwargs": kwargs, **registry.describe(kind, name)}
    return out


def _check(value: Any, annotation: Any, path: str) -> None:
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of settings, got {value!r}")
        hints = typing.get_type_hints(annotation)
        fields = {f.name: f for f in dataclasses.fields(annotation)}
        for key in value:
            if key not in fields:
                prefix = f"{path}." if path else ""
                raise ConfigError(f"{prefix}{key}: unknown config key{did_you_mean(key, fields)}")
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
    check_ranges(config)


def check_ranges(config: Mapping[str, Any]) -> None:
    """Values with a valid range: one line naming the key, the value and what is allowed."""
    data, trainer = config["data"], config["trainer"]
    for key in ("batch_size", "patches_per_epoch"):
        check_range(f"data.{key}", data[key], low=1, allowed="a whole number >= 1")
    check_range("data.num_workers", data["num_workers"], low=0, allowed="a whole number >= 0 (0: load in the main process)")
    for i, size in enumerate(data["patch_size"]):
        check_range(f"data.patch_size[{i}]", size, low=1, allowed="a number of pixels >= 1")
    check_range("data.min_foreground", data.get("min_foreground", 0.0), low=0.0, high=1.0, allowed="a fraction in [0, 1]")
    norm = data["normalize"]
    check_range("data.normalize.low", norm["low"], low=0.0, high=100.0, allowed="a percentile in [0, 100]")
    check_range("data.normalize.high", norm["high"], low=norm["low"], high=100.0, low_open=True,
                allowed=f"a percentile above data.normalize.low ({norm['low']}) and at most 100")
    for key in ("val", "test"):
        value = data["split"][key]
        if not isinstance(value, (list, tuple)):
            check_range(f"data.split.{key}", value, low=0.0, high=1.0, high_open=True,
                        allowed="a fraction in [0, 1), or a list of images")
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if epochs is not None:
        check_range("trainer.max_epochs", epochs, low=1, allowed=(
            "a number of epochs >= 1 (for training until you stop it, set trainer.max_time, e.g. '00:12:00:00')"))
    if steps is not None and steps != -1:
        check_range("trainer.max_steps", steps, low=1, allowed="a number of steps >= 1, or -1 (no step limit)")
    if epochs is None and steps in (None, -1) and not trainer.get("max_time"):
        raise ConfigError("trainer.max_epochs: null with no step or time limit would train forever; "
                          "give trainer.max_epochs, trainer.max_steps or trainer.max_time")
    predict = config["predict"]
    for key, low in (("tile_size", 1), ("overlap", 0)):
        for i, v in enumerate(predict[key] or []):
            check_range(f"predict.{key}[{i}]", v, low=low, allowed=f"a number of pixels >= {low}")
    if predict["batch_size"] is not None:
        check_range("predict.batch_size", predict["batch_size"], low=1, allowed="a number of tiles >= 1 (or null)")
    figures = config["logger"]["figures"]
    check_range("logger.figures.every_n_epochs", figures["every_n_epochs"], low=1, allowed="a number of epochs >= 1")
    check_range("logger.figures.n_samples", figures["n_samples"], low=0, allowed="a number of images >= 0")
    top_k = config.get("checkpoint", {}).get("save_top_k", 1)
    if top_k != -1:
        check_range("checkpoint.save_top_k", top_k, low=1, allowed="a number >= 1, or -1 (keep all)")


# -- composition ----------------------------------------------------------------------------------
def plugin_searchpath(overrides: Sequence[str]) -> list[str]:
    """Add the config packages of installed plugins to Hydra's search path, unless the user set it."""
    from bioflow.registry import registry

    if any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides):
        return []
    packages = [c.target for c in registry.components("configs")]
    packages = [p for p in packages if p != "bioflow.configs"]
    if not packages:
        return []
    return ["hydra.searchpath=[" + ",".join(f"pkg://{p}" for p in packages) + "]"]


def _compose_node(overrides: Sequence[str]):
    """Hydra's composed (unresolved) config for ``overrides``, plugin config folders included."""
    from hydra import compose as hydra_compose, initialize_config_module

    overrides = list(overrides)
    overrides += plugin_searchpath(overrides)
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        return hydra_compose(config_name=PRIMARY_CONFIG, overrides=overrides)


def compose(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved training config for ``overrides``, as ``bioflow train`` composes it.

    Composition errors (unknown keys or group options, missing values) are raised as one-line
    :class:`ConfigError` messages with the closest existing key or option.
    """
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = _compose_node(overrides)
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"config: {explain_composition_error(str(exc), list(overrides))}") from exc


def explain_composition_error(message: str, overrides: list[str]) -> str:
    """Hydra's composition errors in one line, with the closest existing key or option."""
    import re

    parse_error = explain_parse_error(overrides)
    if parse_error:
        return parse_error
    missing_option = re.search(r"Could not find '([^']+)/([^']+)'", message)
    options = re.search(r"Available options in '[^']+':\s*(.*?)\s*Config search path", message, re.S)
    if missing_option and options:
        group, option = missing_option.groups()
        known = options.group(1).split()
        hint = did_you_mean(option, known)
        listed = ", ".join(known)
        listed = listed if len(listed) <= 90 else f"{len(known)} of them; bioflow train --help lists them"
        return f"{group}={option}: no such option in config group '{group}'{hint} (options: {listed})"
    bad_key = re.search(r"Could not override '([^']+)'", message)
    if bad_key:
        key = bad_key.group(1)
        parent, _, leaf = key.rpartition(".")
        hint = ""
        try:
            from omegaconf import DictConfig, OmegaConf

            rest = [o for o in overrides if not o.lstrip("+~").startswith(f"{key}=")]
            cfg = _compose_node(rest)
            node = OmegaConf.select(cfg, parent) if parent else cfg
            while node is None and parent:  # a typo higher up: suggest for the first unknown level
                parent, _, leaf = parent.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
            if isinstance(node, DictConfig):
                hint = did_you_mean(leaf, node.keys(), prefix=f"{parent}." if parent else "")
        except Exception:  # the hint is a courtesy; the error stands without it
            pass
        return f"{key}: no such config key{hint} (to add a new key on purpose: +{key}=...)"
    return first_lines(message)


def explain_parse_error(overrides: Sequence[str]) -> str | None:
    """The first override Hydra's parser cannot read, and how to write it (None if all parse).

    Hydra's grammar takes unquoted values of ASCII letters, digits and a few signs only: names
    with non-ASCII letters, or list items with spaces, must be quoted.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()

    def parses(override: str) -> bool:
        try:
            parser.parse_overrides([override])
            return True
        except HydraException:
            return False

    for override in overrides:
        if parses(override):
            continue
        if override == "--project-dir":
            return "--project-dir: needs a folder (bioflow train --project-dir DIR, or project_dir=DIR)"
        if override.startswith("-"):
            return (f"{override}: not a config override; bioflow train takes key=value overrides "
                    "(e.g. project_dir=... for the project folder), see bioflow train --help")
        key, sep, value = override.partition("=")
        if not sep:
            return f"{override}: not a config override (key=value, +key=value to add a key, ~key to remove one)"
        suggestion = f"{key}={quoted_value(value)}"
        if parses(suggestion):
            return (f"{override}: the config parser needs quotes here (non-ASCII letters, spaces in lists); write "
                    f"{_shell_quoted(suggestion)} (outer quotes for the shell)")
        return (f"{override}: the config parser cannot read this value; quote names with spaces or non-ASCII letters "
                "(\"key='a b'\", \"key=['a b','c']\") and close lists and quotes")
    return None


def quoted_value(value: str) -> str:
    """``value`` with its items quoted for Hydra's grammar (a list's items one by one)."""
    def quote(item: str) -> str:
        item = item.strip()
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            return item
        return f"'{item}'" if "'" not in item else f'"{item}"'

    text = value.strip()
    if text[:1] in "[{" and text[-1:] not in "]}":
        return text  # an open list or mapping: no quoting reads it
    if text.startswith("[") and text.endswith("]"):
        items = [i for i in text[1:-1].split(",") if i.strip()]
        return "[" + ",".join(quote(i) for i in items) + "]"
    return quote(text)


def _shell_quoted(text: str) -> str:
    """``text`` as one argument for a POSIX shell."""
    import shlex

    return shlex.quote(text) if '"' in text or "'" not in text else f'"{text}"'


def first_lines(text: str) -> str:
    """Hydra's messages span lines; keep the informative part on one line."""
    keep = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Set the environment")]
    return " ".join(keep)[:600]
