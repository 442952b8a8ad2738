"""A trained network as files that run without bioflow: PyTorch source + state dict, TorchScript, ONNX.

bioflow's U-Net (``bioflow.models.unet``) and StarDist network (``bioflow.stardist.model``)
import nothing but torch, so their source files, joined into one, are the architecture of a
``pytorch_state_dict`` package entry: a consumer rebuilds the very same module from that file and
loads the very same state dict. The export checks that the joined source still imports only torch
and the standard library, and that the rebuilt module reproduces the network, so a change to
those files that breaks either is caught when a model is exported rather than by a consumer.

Networks from plugins have no such file; they are exported as TorchScript (and ONNX where they
export), which needs no source at all.
"""

from __future__ import annotations

import ast
import inspect
import io
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from bioflow.errors import BioflowError

#: Modules the architecture source may import: torch and parts of the standard library.
ALLOWED_IMPORTS = frozenset({"__future__", "torch", "typing", "math", "collections", "functools", "itertools", "dataclasses"})

# Appended to the StarDist source: the network with its two outputs as separate tensors (so that
# the package can declare a sigmoid for the probability and a clip for the distances), built from
# plain keyword arguments. Its state dict is the one of bioflow's StarDistNet.
_STARDIST_FACTORY = '''

class StarDistOutputs(StarDistNet):
    """StarDistNet returning (object probability logit, ray distances) as two tensors."""

    def forward(self, x):
        out = super().forward(x)
        return out[:, :1], out[:, 1:]


def stardist_network(in_channels, n_rays, grid, features, head_features, stem_channels, pool_first, backbone):
    """The StarDist network: optional pooling stem, U-Net backbone (``backbone``: its arguments), head."""
    grid = [int(g) for g in grid]
    stem = GridStem(in_channels, stem_channels, grid) if pool_first and any(g > 1 for g in grid) else None
    unet = UNet(in_channels=stem_channels if stem is not None else in_channels, out_channels=features, **backbone)
    return StarDistOutputs(unet, features, n_rays, grid, head_features, stem)
'''


# Appended to the probabilistic restoration source: the restored image and its calibrated std as two
# tensors (two outputs of the package). Its state dict is the one of WithStd.
_PROBABILISTIC_FACTORY = '''

class WithStdOutputs(WithStd):
    """WithStd returning (restored image, calibrated std) as two tensors."""

    def forward(self, x):
        out = super().forward(x)
        return out[:, : self.channels], out[:, self.channels:]


def probabilistic_network(channels, std_per_scale, log_range, log_start, min_scale, points, unet):
    """The U-Net (``unet``: its arguments) with the location and calibrated std of its output."""
    return WithStdOutputs(UNet(**unet), channels, std_per_scale, log_range, log_start, min_scale, points)
'''


@dataclass
class TorchSource:
    """An architecture as a source file's text, the callable in it and its keyword arguments."""

    text: str
    callable: str
    kwargs: dict[str, Any] = field(default_factory=dict)


class SplitOutputs(nn.Module):
    """A network whose output channels are handed out as several tensors (e.g. StarDist's
    probability and distances); with one part it returns the output as it is."""

    def __init__(self, net: nn.Module, channels: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.bounds = [0] + [int(c) for c in torch.tensor(list(channels)).cumsum(0)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(x)
        return [out[:, self.bounds[i]:self.bounds[i + 1]] for i in range(len(self.bounds) - 1)]


def _module_text(module: types.ModuleType) -> str:
    """A module's source for the joined architecture file: without its ``__future__`` import and
    without imports from bioflow (the joined file holds what they import)."""
    lines = inspect.getsource(module).splitlines()
    return "\n".join(line for line in lines if not line.startswith(("from __future__ import", "from bioflow.")))


def torch_source(task) -> TorchSource | None:
    """A torch-only source of ``task.package_network()`` (bioflow's U-Net, alone, as StarDist's
    backbone, or inside :class:`bioflow.models.probabilistic.WithStd`), or None."""
    import bioflow.models.probabilistic as probabilistic_module
    import bioflow.models.unet as unet_module
    import bioflow.stardist.model as stardist_module
    from bioflow.config import component

    net = task.package_network()
    wrapper = net if isinstance(net, probabilistic_module.WithStd) else None
    net = wrapper.net if wrapper is not None else net
    backbone = getattr(net, "backbone", None) if isinstance(net, stardist_module.StarDistNet) else net
    if type(backbone) is not unet_module.UNet:
        return None
    name, kwargs = component(task.context.model)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("in_channels", "out_channels")}
    kwargs["spatial_dims"] = task.data_info.spatial_dims
    header = "# The network of a bioflow model, rebuilt with PyTorch alone (bioflow is not needed).\nfrom __future__ import annotations\n"
    if backbone is net and wrapper is not None:
        kwargs.update(in_channels=task.data_info.in_channels, out_channels=task.out_channels())
        text = header + _module_text(unet_module) + "\n\n" + _module_text(probabilistic_module) + _PROBABILISTIC_FACTORY
        return TorchSource(text, "probabilistic_network", {
            "channels": wrapper.channels, "std_per_scale": wrapper.std_per_scale, "log_range": wrapper.log_range,
            "log_start": wrapper.log_start, "min_scale": wrapper.min_scale, "points": int(wrapper.knots.shape[1]),
            "unet": kwargs,
        })
    if backbone is net:
        kwargs.update(in_channels=task.data_info.in_channels, out_channels=task.out_channels())
        return TorchSource(header + _module_text(unet_module) + "\n", "UNet", kwargs)
    s = task.task_settings
    text = header + _module_text(unet_module) + "\n\n" + _module_text(stardist_module) + _STARDIST_FACTORY
    return TorchSource(text, "stardist_network", {
        "in_channels": task.data_info.in_channels, "n_rays": int(s["n_rays"]), "grid": [int(g) for g in task.grid],
        "features": int(s["features"]), "head_features": int(s["head_features"]),
        "stem_channels": int(s["stem_channels"]), "pool_first": bool(s["pool_first"]), "backbone": kwargs,
    })


def check_torch_only(text: str) -> None:
    """Raise if the source imports anything but torch and the standard modules it may use."""
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["." if node.level else (node.module or "")]
        else:
            continue
        bad = [n for n in names if n.split(".")[0] not in ALLOWED_IMPORTS]
        if bad:
            raise BioflowError(
                f"export: the network's source imports {bad[0]}, so it cannot run without bioflow; "
                "its source files must import only torch"
            )


def build_from_source(source: TorchSource) -> nn.Module:
    """The module that ``source`` builds, from its text alone (as a consumer would build it)."""
    module = types.ModuleType("bioflow_exported_architecture")
    sys.modules[module.__name__] = module  # dataclasses and annotations look their module up
    try:
        exec(compile(source.text, "architecture.py", "exec"), module.__dict__)
        return getattr(module, source.callable)(**source.kwargs)
    finally:
        sys.modules.pop(module.__name__, None)


def state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as plain contiguous CPU tensors (the training layout may be channels-last)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}


def torchscript_bytes(net: nn.Module) -> bytes:
    try:
        scripted = torch.jit.script(net)
    except Exception as exc:
        raise BioflowError(f"export: the network does not convert to TorchScript ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def onnx_bytes(net: nn.Module, example: torch.Tensor, output_names: Sequence[str], input_name: str) -> bytes:
    """ONNX (opset 17) with free batch and spatial sizes; raises when the network does not export."""
    import warnings

    axes = {0: "batch", **{2 + i: f"s{i}" for i in range(example.ndim - 2)}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), buffer, input_names=[input_name], output_names=list(output_names),
            dynamic_axes={input_name: axes, **{n: axes for n in output_names}}, opset_version=17, dynamo=False,
        )
    return buffer.getvalue()
