"""Tasks: one LightningModule per kind of analysis, a registry kind (``bioflow.tasks``) like any other.

A task's settings are the keyword arguments of its constructor; the ``task`` config section names
the task (``name``) and gives them.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from bioflow.config import component
from bioflow.kinds import kind
from bioflow.registry import registry

#: Constructor arguments every task takes before its settings (what bioflow provides: bioflow.kinds).
CONTEXT_ARGUMENTS = kind("tasks").provided


def get_task(name: str):
    """The task class registered as ``name`` (a one-line error with close names if none is)."""
    return registry.load("tasks", name)


def default_settings(task_cls) -> dict[str, Any]:
    """The task's settings with their defaults (from its constructor's signature)."""
    parameters = inspect.signature(task_cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in CONTEXT_ARGUMENTS and p.name != "self"
            and p.default is not inspect.Parameter.empty}


def settings_of(task_cls, section: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a ``task`` config section gives, the task's defaults filled in."""
    return {**default_settings(task_cls), **component(section)[1]}


def create_task(config: Mapping[str, Any], data_info: Mapping[str, Any], inference: bool = False):
    """The task of ``config`` (its ``task`` section) for data described by ``data_info``."""
    name, settings = component(config["task"])
    return registry.create("tasks", name, where="task", config=config, data_info=dict(data_info), inference=inference,
                           **settings)


def with_legacy_settings(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the settings its task gained after the model was saved set to the values the
    model was built with (the task's ``legacy_settings``)."""
    task_cls = get_task(config["task"]["name"])
    missing = {k: v for k, v in task_cls.legacy_settings.items() if k not in config["task"]}
    return {**config, "task": {**config["task"], **missing}} if missing else config
