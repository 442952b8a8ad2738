"""Batch norm folded into the convolution before it, for inference.

In evaluation a batch norm is a fixed per-channel affine map, so a convolution followed by one is
the same linear map as the convolution alone with scaled weights and a shifted bias:
``w' = w * g / sqrt(v + eps)`` and ``b' = (b - m) * g / sqrt(v + eps) + beta``. The folded network
gives the same outputs up to float rounding and skips one pass over every normalised activation
(about a tenth of StarDist's prediction time on the CPU).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def foldable(conv: nn.Module, norm: nn.Module) -> bool:
    """Whether ``norm`` (right after ``conv``) can be folded into it."""
    return (isinstance(conv, _CONVS) and isinstance(norm, _NORMS) and norm.running_mean is not None
            and norm.running_var is not None and conv.out_channels == norm.num_features)


def _pairs(module: nn.Module) -> list[tuple[nn.Sequential, str, str]]:
    """(sequence, convolution's name, batch norm's name) of every foldable pair."""
    found = []
    for parent in module.modules():
        if isinstance(parent, nn.Sequential):
            names = list(parent._modules)
            for first, second in zip(names, names[1:]):
                conv, norm = parent._modules[first], parent._modules[second]
                if conv is not None and norm is not None and foldable(conv, norm):
                    found.append((parent, first, second))
    return found


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in which each batch norm that directly follows a convolution inside an
    ``nn.Sequential`` is folded into that convolution (and replaced by ``nn.Identity``); for
    inference only (the running statistics are used, as in evaluation). ``module`` itself when
    there is nothing to fold or it cannot be copied (e.g. a wrapper of a compiled network)."""
    if not _pairs(module):
        return module
    try:
        folded = copy.deepcopy(module)
    except Exception:
        return module
    for parent, first, second in _pairs(folded):
        conv, norm = parent._modules[first], parent._modules[second]
        with torch.no_grad():
            scale = torch.rsqrt(norm.running_var.float() + norm.eps)
            shift = -norm.running_mean.float() * scale
            if norm.affine:
                shift = shift * norm.weight + norm.bias
                scale = scale * norm.weight
            shape = (-1,) + (1,) * (conv.weight.dim() - 1)
            weight = conv.weight * scale.reshape(shape).to(conv.weight.dtype)
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.weight = nn.Parameter(weight, requires_grad=False)
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        parent._modules[second] = nn.Identity()
    return folded.eval()
