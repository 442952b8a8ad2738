"""Tasks: one LightningModule per kind of bioimage analysis, looked up by the ``task.name`` setting."""

from __future__ import annotations

import importlib

from bioflow.errors import ConfigError, did_you_mean

#: Task name -> "module:class"; imported on first use.
TASKS: dict[str, str] = {
    "segmentation": "bioflow.tasks.segmentation:SegmentationTask",
    "stardist": "bioflow.tasks.stardist:StarDistTask",
    "care": "bioflow.tasks.restoration:CARETask",
    "n2v": "bioflow.tasks.restoration:N2VTask",
}


def get_task(name: str):
    """The task class called ``name``."""
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task '{name}'{did_you_mean(name, TASKS)} (tasks: {', '.join(TASKS)})")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
