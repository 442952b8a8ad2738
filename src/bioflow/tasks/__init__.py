"""Tasks: one LightningModule per kind of bioimage analysis, looked up by the ``task.name`` setting."""

from __future__ import annotations

import difflib
import importlib

from bioflow.errors import ConfigError

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
        close = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"task.name: unknown task '{name}'{hint} (tasks: {', '.join(TASKS)})")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
