"""Optimizers from the config: fused implementations by default on the CPU, the config's choice kept."""

from __future__ import annotations

import torch

from bioflow.optim import configure_optimization
from bioflow.testing import compose_config


def optimizer_of(*overrides, params=None):
    config = compose_config(*overrides)
    params = params if params is not None else [torch.nn.Parameter(torch.randn(3))]
    result = configure_optimization(iter(params), config, 2, "val/loss", "min")
    return result["optimizer"] if isinstance(result, dict) else result


def test_cpu_float32_weights_get_the_fused_implementation_unless_the_config_chooses():
    for name in ("adam", "adamw", "sgd"):
        optimizer = optimizer_of(f"optimizer={name}")
        assert optimizer.defaults["fused"] is True, name
        assert len(optimizer.param_groups[0]["params"]) == 1  # the parameters were not used up
    assert optimizer_of("+optimizer.foreach=false").defaults["fused"] in (None, False)
    assert optimizer_of("+optimizer.fused=false").defaults["fused"] is False
    half = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    assert optimizer_of(params=half).defaults["fused"] in (None, False)

