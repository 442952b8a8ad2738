"""The plugin test kit: contract checks for components, and helpers for testing models.

A component passes its contract when bioflow can use it the way its kind promises. Plugin authors
run the same checks on their components that bioflow runs on its own::

    from bioflow.testing import check_component

    def test_contract(bioflow_component):          # parametrised by bioflow's pytest plugin
        check_component(*bioflow_component)

or call a check directly: ``check_architecture(MyNet)``. Failed checks raise ``AssertionError``
with the reason.

Components describe themselves with optional attributes (on the class or factory function):

``bioflow_spatial_dims``
    the spatial dimensionalities supported, e.g. ``(2, 3)``. Default for architectures: ``(2, 3)``
    if the factory takes ``spatial_dims``, else ``(2,)``; for losses and post-processors ``(2, 3)``.
``bioflow_exports``
    architectures: export formats that must work, from ``"torchscript"`` and ``"onnx"``.
``example_inputs(spatial_dims)``
    losses: returns ``(prediction, target)`` the loss is meant for (default: class logits and
    class indices); post-processors: ``example_input(spatial_dims)`` returns the network output they
    take (default: two-class probabilities).
``bioflow_example_kwargs``
    datasets (and any component with required arguments): keyword arguments for a small example.

Besides the contracts, :func:`compose_config` and :func:`make_checkpoint` build configs and
untrained checkpoints for testing prediction and evaluation code.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Any, Callable

import numpy as np

Factory = Callable[..., Any]


def _accepts(factory: Factory, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _spatial_dims(factory: Factory) -> tuple[int, ...]:
    declared = getattr(factory, "bioflow_spatial_dims", None)
    if declared is not None:
        return tuple(declared)
    return (2, 3) if _accepts(factory, "spatial_dims") else (2,)


def _kwargs(factory: Factory, extra: dict[str, Any]) -> dict[str, Any]:
    return {**dict(getattr(factory, "bioflow_example_kwargs", {}) or {}), **extra}


# -- architectures ----------------------------------------------------------------------------------
def check_architecture(factory: Factory, in_channels: int = 2, out_channels: int = 3, **kwargs: Any) -> None:
    """Output shape for every declared dimensionality, gradients to every parameter, exports claimed."""
    import torch

    for dims in _spatial_dims(factory):
        args = _kwargs(factory, kwargs)
        if _accepts(factory, "spatial_dims"):
            args["spatial_dims"] = dims
        net = factory(in_channels=in_channels, out_channels=out_channels, **args)
        assert isinstance(net, torch.nn.Module), f"{factory!r} must build a torch.nn.Module, got {type(net).__name__}"
        multiple = int(getattr(net, "size_multiple", 1))
        edge = max(32 if dims == 2 else 16, 2 * multiple)
        edge = -(-edge // multiple) * multiple
        x = torch.randn((2, in_channels) + (edge,) * dims)
        out = net(x)
        expected = (2, out_channels) + (edge,) * dims
        assert tuple(out.shape) == expected, f"{dims}D: output shape {tuple(out.shape)}, expected {expected}"
        out.square().mean().backward()
        unreached = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
        assert not unreached, f"{dims}D: no gradient reaches {unreached[:5]}"
        if hasattr(net, "receptive_field"):
            rf = net.receptive_field()
            assert isinstance(rf, int) and rf >= 1, f"receptive_field() must be a positive int, got {rf!r}"
        net.eval()
        with torch.no_grad():
            reference = net(x)
            assert torch.equal(reference, net(x)), f"{dims}D: evaluation is not deterministic"
        for fmt in getattr(factory, "bioflow_exports", ()):
            _check_export(net, x, reference, fmt, dims)


def _check_export(net, x, reference, fmt: str, dims: int) -> None:
    import torch

    if fmt == "torchscript":
        scripted = torch.jit.script(net)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        with torch.no_grad():
            assert torch.allclose(loaded(x), reference, atol=1e-5), f"{dims}D: TorchScript output differs"
    elif fmt == "onnx":
        try:
            import onnx
        except ImportError:
            import pytest

            pytest.skip("the component claims ONNX export; install onnx to check it")
        buffer = io.BytesIO()
        torch.onnx.export(net, (x,), buffer, dynamo=False)
        onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    else:
        raise AssertionError(f"unknown export format {fmt!r} in bioflow_exports (torchscript, onnx)")


# -- losses -------------------------------------------------------------------------------------------
def _default_loss_inputs(spatial_dims: int):
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (2,) + (12,) * spatial_dims
    return torch.randn((2, 3) + shape[1:], generator=g), torch.randint(0, 3, shape, generator=g)


def check_loss(factory: Factory, **kwargs: Any) -> None:
    """A finite scalar, differentiable with respect to the prediction, on the loss's example inputs."""
    import torch

    loss_fn = factory(**_kwargs(factory, kwargs))
    example = getattr(loss_fn, "example_inputs", None) or getattr(factory, "example_inputs", None)
    for dims in getattr(factory, "bioflow_spatial_dims", (2, 3)):
        prediction, target = example(dims) if example is not None else _default_loss_inputs(dims)
        prediction = prediction.detach().clone().requires_grad_(True)
        value = loss_fn(prediction, target)
        assert isinstance(value, torch.Tensor) and value.dim() == 0, f"{dims}D: the loss must be a scalar tensor"
        assert torch.isfinite(value), f"{dims}D: the loss is {value.item()}"
        value.backward()
        assert prediction.grad is not None and prediction.grad.abs().sum() > 0, f"{dims}D: no gradient"


# -- post-processors ---------------------------------------------------------------------------------------
def _default_postprocessor_input(spatial_dims: int) -> np.ndarray:
    shape = (32,) * spatial_dims
    fg = np.zeros(shape, np.float32)
    fg[(slice(4, 12),) * spatial_dims] = 0.9
    return np.stack([1 - fg, fg])


def check_postprocessor(factory: Factory, **kwargs: Any) -> None:
    """Network output in, integer labels of the spatial shape out; deterministic; nothing from zeros."""
    post = factory(**_kwargs(factory, kwargs))
    example = getattr(post, "example_input", None) or getattr(factory, "example_input", None)
    for dims in getattr(factory, "bioflow_spatial_dims", (2, 3)):
        output = example(dims) if example is not None else _default_postprocessor_input(dims)
        labels = np.asarray(post(output))
        assert labels.shape == output.shape[1:], f"{dims}D: labels shape {labels.shape}, expected {output.shape[1:]}"
        assert np.issubdtype(labels.dtype, np.integer), f"{dims}D: labels must be integers, got {labels.dtype}"
        assert labels.min() >= 0 and labels.max() >= 1, f"{dims}D: expected objects labelled 1.., background 0"
        assert np.array_equal(labels, np.asarray(post(output))), f"{dims}D: not deterministic"
        assert not np.asarray(post(np.zeros_like(output))).any(), f"{dims}D: an all-zero output must give no objects"


# -- samplers ------------------------------------------------------------------------------------------------
def _example_index():
    from bioflow.data.patches import PatchIndex
    from bioflow.data.records import ImageRecord

    rng = np.random.default_rng(0)
    records = [
        ImageRecord(f"img{i}", rng.random((1, 48, 40 + 8 * i)).astype(np.float32), rng.integers(0, 3, (48, 40 + 8 * i)))
        for i in range(3)
    ]
    return PatchIndex(records, (16, 16))


def check_sampler(factory: Factory, **kwargs: Any) -> None:
    """Length, valid indices, the same draw for the same seed and epoch, a new draw for a new epoch."""
    index = _example_index()
    args = _kwargs(factory, kwargs)
    sampler = factory(index=index, num_samples=50, seed=3, **args)
    drawn = list(sampler)
    assert len(sampler) == 50 and len(drawn) == 50, f"expected 50 draws, got len {len(sampler)} and {len(drawn)} drawn"
    assert all(0 <= int(i) < len(index) for i in drawn), "indices outside the candidate index"
    assert list(factory(index=index, num_samples=50, seed=3, **args)) == drawn, "not reproducible from the seed"
    assert list(sampler) == drawn, "a second pass of the same epoch draws differently"
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(1)
        assert list(sampler) != drawn, "set_epoch(1) draws the same sequence as epoch 0"


# -- batch transforms -------------------------------------------------------------------------------------------
def check_batch_transform(factory: Factory, **kwargs: Any) -> None:
    """``(image) -> (network input, loss mask)`` of the image's shape; reproducible with a seeded generator."""
    import torch

    transform = factory(**_kwargs(factory, kwargs))
    for dims in (2, 3):
        image = torch.rand((2, 1) + (32,) * dims, generator=torch.Generator().manual_seed(0))
        first, mask = transform(image, generator=torch.Generator().manual_seed(5))
        second, mask2 = transform(image, generator=torch.Generator().manual_seed(5))
        assert first.shape == image.shape and mask.shape == image.shape, f"{dims}D: shapes change"
        assert mask.dtype == torch.bool, f"{dims}D: the loss mask must be boolean"
        assert torch.equal(first, second) and torch.equal(mask, mask2), f"{dims}D: not reproducible with a seeded generator"


# -- datasets ---------------------------------------------------------------------------------------------------------
def check_dataset(factory: Factory, **kwargs: Any) -> None:
    """A list of image records that pass bioflow's data checks."""
    from bioflow.data.records import ImageRecord, check_records

    required = [
        n for n, p in inspect.signature(factory).parameters.items()
        if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    args = _kwargs(factory, kwargs)
    missing = [n for n in required if n not in args]
    if missing:
        import pytest

        pytest.skip(f"needs {', '.join(missing)}: give bioflow_example_kwargs to check it")
    records = factory(**args)
    assert records and all(isinstance(r, ImageRecord) for r in records), "must return a list of ImageRecord"
    check_records(records, needs_target=False, allow_empty_targets=True)


CHECKS: dict[str, Callable[..., None]] = {
    "architectures": check_architecture,
    "losses": check_loss,
    "postprocessors": check_postprocessor,
    "samplers": check_sampler,
    "batch_transforms": check_batch_transform,
    "datasets": check_dataset,
}

#: Small arguments for built-in components whose defaults would make the checks slow.
_SMALL = {("architectures", "bioflow:unet"): {"depth": 2, "base_channels": 4},
          ("datasets", "bioflow:synthetic_nuclei"): {"n_images": 2, "shape": (48, 48)}}


def registered(distribution: str | None = None) -> list[tuple[str, str]]:
    """(kind, qualified name) of every registered component with a contract, optionally of one distribution."""
    from bioflow.registry import canonical_distribution, registry

    wanted = canonical_distribution(distribution) if distribution else None
    return [
        (kind, c.qualified_name)
        for kind in CHECKS
        for c in registry.components(kind)
        if wanted is None or c.distribution == wanted
    ]


def check_component(kind: str, name: str, **kwargs: Any) -> None:
    """Load component ``name`` of ``kind`` from the registry and run its contract."""
    from bioflow.registry import registry

    factory = registry.load(kind, name)
    qualified = registry.resolve(kind, name).qualified_name
    CHECKS[kind](factory, **{**_SMALL.get((kind, qualified), {}), **kwargs})


# -- configs and checkpoints for tests ---------------------------------------------------------------------------------
def compose_config(*overrides: str) -> dict:
    """The resolved training config for ``overrides`` (as ``bioflow train`` would compose it)."""
    from bioflow.config import _compose_node
    from omegaconf import OmegaConf

    return OmegaConf.to_container(_compose_node(overrides), resolve=True)


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
