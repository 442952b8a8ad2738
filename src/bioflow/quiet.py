"""What the dependencies say about themselves, kept off bioflow's screen.

Before the first epoch, Lightning advertises a cloud logger and lists the accelerators it did not
find, its pytree helper warns about its own deprecation, and MLflow announces the creation of its
database tables and of every new experiment. None of it is about the user's job; bioflow says what
matters in its own lines. Only these known messages are dropped: bioflow's own warnings, and every
other warning of the libraries, still show.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

#: Loggers whose INFO lines are about the library itself (warnings and errors still show).
CHATTY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",   # GPU/TPU available, the litlogger tip, "Trainer.fit stopped"
    "lightning.pytorch.accelerators.cuda",     # LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES
    "lightning.fabric.utilities.seed",
    "mlflow.store.db.utils",                   # creating and updating the database tables
    "alembic.runtime.migration",
)

#: Messages dropped wherever they come from (regular expressions, matched at the start).
DROPPED_MESSAGES = (
    r"Experiment with name .* not found\. Creating it\.",  # MLflow's logger in Lightning, for every new experiment
    r".*litlogger",
)

#: Warnings about the libraries' own internals (not about the user's settings).
DROPPED_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _DropKnown(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in DROPPED_MESSAGES]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        return not any(p.match(message) for p in self.patterns)


_FILTER = _DropKnown()


def quiet_dependencies(progress: bool = True) -> None:
    """Drop the dependencies' messages about themselves (idempotent); with ``progress=False``, also
    MLflow's download progress bars."""
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level in (logging.NOTSET, logging.DEBUG, logging.INFO):
            logger.setLevel(logging.WARNING)
    for name in ("lightning.pytorch.loggers.mlflow", "lightning.pytorch.utilities.rank_zero", "lightning.pytorch", "mlflow"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for pattern in DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if not progress:
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
