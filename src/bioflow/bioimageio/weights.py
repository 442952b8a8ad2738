"""The weights of a package: PyTorch state dict with a torch-only architecture source (bioflow's own
networks), TorchScript, and ONNX where the network exports; each checked against the network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bioflow.bioimageio.description import INPUT_ID, ExportError, Layout


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


def write_weights(task, folder: Path, lay: Layout, example: np.ndarray) -> tuple[dict[str, Any], list[str]]:
    """The weights entries of the package (files written into ``folder``) and notes on them."""
    import torch

    from bioflow.bioimageio import networks

    net = task.package_network().eval()
    weights: dict[str, Any] = {}
    notes: list[str] = []
    version = _torch_version()
    source = networks.torch_source(task)
    parent = None
    x = torch.from_numpy(example)
    with torch.no_grad():
        reference = net(x)
    if source is not None:
        networks.check_torch_only(source.text)
        rebuilt = networks.build_from_source(source)
        rebuilt.load_state_dict(networks.state_dict(net), strict=True)
        with torch.no_grad():
            again = torch.cat(list(_as_tuple(rebuilt.eval()(x))), dim=1)
        # Up to float32 rounding at the output's scale: the training layout (channels-last) and
        # the rebuilt one may sum the same products in another order (a steep recalibration of a
        # predicted std magnifies that rounding by its slope).
        scale = max(1.0, float(reference.abs().max())) * (net.steepest() if hasattr(net, "steepest") else 1.0)
        if not torch.allclose(again, reference, rtol=1e-5, atol=1e-5 * scale):
            raise ExportError("export: the torch-only source of the network does not reproduce it (a bug: please report it)")
        (folder / "architecture.py").write_text(source.text)
        torch.save(networks.state_dict(net), folder / "weights.pt")
        weights["pytorch_state_dict"] = {
            "source": "weights.pt", "pytorch_version": version,
            "architecture": {"source": "architecture.py", "callable": source.callable, "kwargs": source.kwargs},
        }
        parent = "pytorch_state_dict"
    else:
        notes.append("The architecture comes from a plugin and has no torch-only source, so the package holds no "
                     "`pytorch_state_dict` weights: TorchScript needs no source.")
    split = networks.SplitOutputs(_plain_copy(net), lay.output_channels).eval()
    (folder / "weights_torchscript.pt").write_bytes(networks.torchscript_bytes(split))
    weights["torchscript"] = {"source": "weights_torchscript.pt", "pytorch_version": version}
    if parent:
        weights["torchscript"]["parent"] = parent
    parent = parent or "torchscript"
    try:
        data = networks.onnx_bytes(split, x, [o.id for o in lay.outputs], INPUT_ID)
    except Exception as exc:  # the net does not export: the other formats suffice
        notes.append(f"No ONNX weights: the network does not export to ONNX ({type(exc).__name__}).")
    else:
        (folder / "weights.onnx").write_bytes(data)
        weights["onnx"] = {"source": "weights.onnx", "opset_version": 17, "parent": parent}
    return weights, notes


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _plain_copy(net):
    """A copy of the network in the default memory layout (what TorchScript and ONNX should record)."""
    import copy
    import inspect

    import torch

    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format).float().cpu()
    for module in plain.modules():  # properties (size_multiple, ...) describe the net; forward needs none
        cls = type(module)
        names = [k for k, v in inspect.getmembers(cls) if isinstance(v, property) and not k.startswith("_")]
        if names and not cls.__module__.startswith("torch."):
            module.__class__ = type(cls.__name__, (cls,), {"__jit_unused_properties__": names, "__module__": cls.__module__})
    return plain
