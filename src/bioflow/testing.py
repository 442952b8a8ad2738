"""Helpers for testing bioflow components and models (also used by plugin authors).

``compose_config`` gives the resolved training config for some overrides, exactly as
``bioflow train`` composes it; ``make_checkpoint`` writes a complete checkpoint of an untrained
model without running any training, for testing prediction and evaluation code quickly.
"""

from __future__ import annotations

from pathlib import Path


def compose_config(*overrides: str) -> dict:
    """The resolved training config for ``overrides`` (as ``bioflow train`` would compose it)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="bioflow.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def make_checkpoint(path: Path, *overrides: str, in_channels: int = 1, spatial_dims: int = 2,
                    pixel_size: list[float] | None = None, seed: int = 0) -> Path:
    """An untrained but complete bioflow checkpoint (random weights), without running training."""
    import torch

    from bioflow.tasks import get_task

    config = compose_config(*overrides)
    torch.manual_seed(seed)
    data_info = {"in_channels": in_channels, "spatial_dims": spatial_dims, "pixel_size": pixel_size,
                 "split": {"train": [], "val": [], "test": []}}
    task = get_task(config["task"]["name"])(config, data_info)
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": {"config": config, "data_info": data_info}}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path
