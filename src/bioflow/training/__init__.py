"""The training job: config validation before work (:mod:`.validation`), resuming an interrupted
job (:mod:`.resume`) and the job itself (:mod:`.job`: data, task, Lightning trainer, MLflow run,
test and summary).

``run_training``, ``print_summary`` and ``scale_check`` are importable from here too; they load
Lightning on first use, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

_JOB = ("run_training", "print_summary", "scale_check")
__all__ = list(_JOB)


def __getattr__(name: str) -> Any:
    if name in _JOB:
        from bioflow.training import job

        return getattr(job, name)
    raise AttributeError(f"module 'bioflow.training' has no attribute '{name}'")
