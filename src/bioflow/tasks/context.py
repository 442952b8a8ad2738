"""What a task uses of the training config besides its own settings, handed over explicitly.

A task's constructor still receives the whole resolved config (it is saved with the model, so that
checkpoints rebuild it and old plugins keep their signature), but the task template reads it once,
here, into named fields; tasks and the tiled predictor use those fields instead of reaching into
arbitrary sections. What a task may depend on is thereby written down in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


@dataclass
class TaskContext:
    """The sections of the config a task builds from or predicts with."""

    name: str  # the task's registered name (``task.name``)
    model: dict[str, Any]  # the network: registry name and arguments
    loss: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    predict: dict[str, Any]  # tile_size, overlap, batch_size, precision
    normalize: dict[str, Any]  # data.normalize: how images are normalised
    channels: Optional[list] = None  # data.channels: the channels of the input files used
    figure_samples: int = 0  # validation images shown in each epoch's figure
    seed: int = 0
    postprocessor: Optional[dict[str, Any]] = None
    batch_transform: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)  # nothing yet: room for sections plugins add

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TaskContext":
        data = config.get("data") or {}
        return cls(
            name=str(config["task"]["name"]),
            model=dict(config["model"]),
            loss=dict(config.get("loss") or {}),
            optimizer=dict(config.get("optimizer") or {}),
            scheduler=dict(config.get("scheduler") or {}),
            predict=dict(config.get("predict") or {}),
            normalize=dict(data.get("normalize") or {}),
            channels=data.get("channels"),
            figure_samples=int(((config.get("logger") or {}).get("figures") or {}).get("n_samples", 0)),
            seed=int(config.get("seed") or 0),
            postprocessor=dict(config["postprocessor"]) if config.get("postprocessor") else None,
            batch_transform=dict(config["batch_transform"]) if config.get("batch_transform") else None,
        )
