"""Configs and untrained checkpoints for testing prediction and evaluation code."""

from __future__ import annotations

from pathlib import Path

def compose_config(*overrides: str) -> dict:
    """The resolved training config for ``overrides`` (as ``bioflow train`` would compose it)."""
    from bioflow.config import _compose_node
    from omegaconf import OmegaConf

    return OmegaConf.to_container(_compose_node(overrides), resolve=True)


def make_checkpoint(path: Path, *overrides: str, in_channels: int = 1, spatial_dims: int = 2,
                    pixel_size: list[float] | None = None, seed: int = 0) -> Path:
    """An untrained but complete bioflow checkpoint (random weights), without running training."""
    import torch

    from bioflow.tasks import create_task

    config = compose_config(*overrides)
    torch.manual_seed(seed)
    data_info = {"in_channels": in_channels, "spatial_dims": spatial_dims, "pixel_size": pixel_size,
                 "split": {"train": [], "val": [], "test": []}}
    task = create_task(config, data_info)
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": {"config": config, "data_info": data_info}}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path
