"""bioflow from Python (notebooks, scripts): the same jobs as the command line, the same checks.

>>> import bioflow
>>> summary = bioflow.train(["experiment=demo_unet", "trainer.max_epochs=1"])   # doctest: +SKIP
>>> summary["test"]["test/dice_nucleus"]                                      # doctest: +SKIP

Every function validates its inputs exactly like the corresponding ``bioflow`` command and raises
:class:`bioflow.errors.BioflowError` (one-line message) on bad input.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence


def _as_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        import json

        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return [str(o) for o in overrides]


def train(overrides: Sequence[str] | Mapping[str, Any] | None = None, *, job_dir: str | Path | None = None) -> dict[str, Any]:
    """Train (and test) a model from config overrides, as ``bioflow train`` does; tracked in MLflow.

    Parameters
    ----------
    overrides
        Hydra overrides, e.g. ``["experiment=demo_stardist", "trainer.max_epochs=2"]``, or a mapping
        ``{"experiment": "demo_stardist", "trainer.max_epochs": 2}``.
    job_dir
        Folder for this job's checkpoints and logs (default: ``<project_dir>/outputs/<date>/<time>``).

    Returns
    -------
    dict
        The job summary: ``run_id``, ``experiment``, ``tracking_uri``, ``best_checkpoint``,
        ``best_score``, ``test`` (test-split metrics), ``after_fit`` (e.g. StarDist thresholds),
        ``output_dir``, ``predict`` and ``dashboard`` (commands), ``performance``.
    """
    from bioflow.config import compose, validate
    from bioflow.train import run_training

    config = compose(_as_overrides(overrides))
    validate(config)
    if job_dir is None:
        now = datetime.datetime.now()
        job_dir = Path(config["project_dir"]) / "outputs" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")
    job_dir = Path(job_dir).expanduser().resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    return run_training(config, job_dir)
