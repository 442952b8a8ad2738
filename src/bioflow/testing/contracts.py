"""Contract checks: a component passes when bioflow can use it the way its kind promises (see
:mod:`bioflow.testing`)."""

from __future__ import annotations

import inspect
import io
import pickle
from typing import Any, Callable

import numpy as np

from bioflow.kinds import KINDS, example_inputs

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


# -- models ----------------------------------------------------------------------------------
def check_model(factory: Factory, in_channels: int = 2, out_channels: int = 3, **kwargs: Any) -> None:
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
    example = example_inputs(loss_fn, "losses") or example_inputs(factory, "losses")
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
    example = example_inputs(post, "postprocessors") or example_inputs(factory, "postprocessors")
    for dims in getattr(factory, "bioflow_spatial_dims", (2, 3)):
        (output,) = example(dims) if example is not None else (_default_postprocessor_input(dims),)
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


# -- data sources ---------------------------------------------------------------------------------------------------------
def check_source(factory: Factory, **kwargs: Any) -> None:
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


# -- tasks -----------------------------------------------------------------------------------------------------------
def _task_batch(target_kind: str, n: int, shape: tuple[int, ...], seed: int, target_fn=None) -> dict[str, Any]:
    """A batch of normalised images with the targets a task of ``target_kind`` trains on (label
    images through the task's ``target_fn``, as the data loader applies it)."""
    import torch

    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image

    images, labels = zip(*(synthetic_nuclei_image(shape, seed=seed, index=i) for i in range(n)))
    batch: dict[str, Any] = {
        "image": torch.from_numpy(np.stack(images)[:, None].astype(np.float32)),
        "name": [f"image{i}" for i in range(n)],
        "norm": torch.tensor([[[0.0], [1.0]]] * n),
    }
    if target_kind == "mask":
        batch["target"] = torch.from_numpy(np.stack([target_fn(t) if target_fn else t for t in labels]).astype(np.int64))
    elif target_kind == "image":
        batch["target"] = batch["image"].clone()
    return batch


def check_task(factory: Factory, name: str | None = None, overrides: tuple[str, ...] = (), **kwargs: Any) -> None:
    """A task trains a step, evaluates a whole image, and predicts an image into its outputs.

    The task is built from its own config (``task=<name>``, which brings its loss and model) with
    ``overrides``; a task declares the spatial dimensionalities it supports in
    ``bioflow_spatial_dims`` (default 2D).
    """
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from bioflow.prediction import predict_array
    from bioflow.tasks import CONTEXT_ARGUMENTS, create_task
    from bioflow.testing.configs import compose_config
    from bioflow.testing.exchange import check_exchange

    params = [p for n, p in inspect.signature(factory.__init__).parameters.items() if n not in CONTEXT_ARGUMENTS | {"self"}]
    for p in params:
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty, (
            f"setting '{p.name}' must be a keyword-only argument with a default")
    assert {"monitor", "monitor_mode"} <= {p.name for p in params}, "a task needs the settings monitor and monitor_mode"
    name = name or getattr(factory, "bioflow_name", None)
    assert name, "check_task needs the task's registered name"
    for dims in getattr(factory, "bioflow_spatial_dims", (2,)):
        shape = (48, 48) if dims == 2 else (16, 32, 32)
        config = compose_config(f"task={name}", *overrides)
        info = {"in_channels": 1, "spatial_dims": dims, "pixel_size": None, "split": {}}
        task = create_task(config, info)
        batch = _task_batch(factory.target_kind, 2, shape, seed=1, target_fn=factory.target_transform(task.task_settings))
        task.train()
        inputs, target = task.training_pair(batch)
        made_in_loader = task.loader_loss_target()
        if made_in_loader is not None:  # the data loader's workers get a pickled copy
            made = pickle.loads(pickle.dumps(made_in_loader))(batch["target"])
            assert torch.allclose(made, target), f"{dims}D: loader_loss_target() makes another target than loss_target()"
        loss = task.loss_fn(task.loss_input(task(inputs)), target)
        assert loss.dim() == 0 and torch.isfinite(loss), f"{dims}D: the training loss must be a finite scalar"
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.parameters()), f"{dims}D: no gradient"
        one = _task_batch(factory.target_kind, 1, shape, seed=2, target_fn=factory.target_transform(task.task_settings))
        loader = DataLoader([{k: v[0] if isinstance(v, (list, torch.Tensor)) else v for k, v in one.items()}], batch_size=1)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.validate(task, dataloaders=loader, verbose=False)
        task.eval()
        outputs = task.prediction_outputs()
        assert outputs, f"{dims}D: prediction_outputs() names no output"
        predicted = predict_array(task, one["image"][0].numpy(), tile_size=[32 if dims == 2 else 16])
        for spec in outputs:
            assert spec.name in predicted, f"{dims}D: output '{spec.name}' was not produced"
            if spec.table:
                assert predicted[spec.name].dtype.names, f"{dims}D: table '{spec.name}' is no structured array"
                continue
            assert tuple(predicted[spec.name].shape[-dims:]) == shape, (
                f"{dims}D: output '{spec.name}' has shape {predicted[spec.name].shape}, not the image's {shape}")
        check_exchange(task, one["image"][0].numpy(), tile_size=[32 if dims == 2 else 16])


CHECKS: dict[str, Callable[..., None]] = {k.name: globals()[k.check] for k in KINDS if k.check}

#: Small arguments for built-in components whose defaults would make the checks slow.
_SMALL = {("models", "bioflow:unet"): {"depth": 2, "base_channels": 4},
          **{("tasks", f"bioflow:{t}"): {"overrides": ("model.base_channels=4", "model.depth=1")}
             for t in ("segmentation", "care", "n2v")},
          **{("tasks", f"bioflow:{t}"): {"overrides": ("model.base_channels=4", "model.depth=1", "task.head_features=8",
                                                     "task.stem_channels=4", "task.n_rays=16")}
             for t in ("stardist", "stardist3d")},
          ("sources", "bioflow:synthetic_nuclei"): {"n_images": 2, "shape": (48, 48)}}


#: The names these checks had before the registry's kinds were renamed (kept for one release).
check_architecture = check_model
check_dataset = check_source


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
    component = registry.resolve(kind, name)
    extra = {"name": component.name} if kind == "tasks" else {}
    CHECKS[kind](factory, **{**_SMALL.get((kind, component.qualified_name), {}), **extra, **kwargs})
