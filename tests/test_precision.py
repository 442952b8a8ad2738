"""``trainer.precision: auto`` and float32 evaluation whatever precision trains the network."""

from __future__ import annotations

import pytest
import torch

from bioflow import precision
from bioflow.errors import ConfigError
from bioflow.precision import resolve_precision
from bioflow.testing import compose_config
from bioflow.training.validation import validate


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_the_cpu_is_bf16_only_with_native_support(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision({"accelerator": "cpu", "precision": "auto"})["precision"] == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision({"accelerator": "auto", "precision": "auto"})["precision"] == expected


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_a_gpu_is_mixed(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    for accelerator in ("gpu", "cuda", "auto"):
        assert resolve_precision({"accelerator": accelerator, "precision": "auto"})["precision"] == expected


def test_explicit_precisions_are_kept_and_other_accelerators_stay_full(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    for value in ("32-true", "16-mixed", "bf16-mixed", 32):
        assert resolve_precision({"accelerator": "cpu", "precision": value})["precision"] == value
    assert resolve_precision({"accelerator": "mps", "precision": "auto"})["precision"] == "32-true"
    assert resolve_precision({"accelerator": "cpu"}) == {"accelerator": "cpu"}


def test_the_stardist_recipe_uses_auto_and_validation_accepts_it_but_not_typos():
    config = compose_config("task=stardist")
    assert config["trainer"]["precision"] == "auto" and config["predict"]["precision"] == "32-true"
    validate(config)
    assert compose_config("task=stardist", "trainer.precision=32-true")["trainer"]["precision"] == "32-true"
    with pytest.raises(ConfigError, match=r"trainer\.precision"):
        validate(compose_config("task=stardist", "trainer.precision=bf17"))


def test_validation_and_test_run_in_the_prediction_precision_not_the_training_autocast():
    from bioflow.tasks import create_task

    config = compose_config("task=stardist", "model.depth=1", "model.base_channels=4", "task.features=4",
                            "task.head_features=0", "task.stem_channels=4", "predict.precision=32-true")
    task = create_task(config, {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": {}})
    seen = []
    task.model.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    labels = torch.zeros(1, 32, 32, dtype=torch.int64)
    labels[0, 8:20, 8:20] = 1
    batch = {"image": torch.rand(1, 1, 32, 32), "target": labels, "name": ["a"]}
    task.on_validation_epoch_start()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        task(batch["image"])  # the training step: autocast applies
        task.validation_step(batch, 0)
        task.test_step(batch, 0)
    assert seen[0][1] == torch.bfloat16
    assert len(seen) >= 3 and all(out == torch.float32 for _, out in seen[1:])


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_prediction_precision_auto_is_bf16_only_where_native_and_never_float16(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    assert precision.inference_precision("auto", "cpu") == expected
    assert precision.inference_precision("auto", "cuda") == expected
    assert precision.inference_precision("auto", "mps") == "32-true"
    assert precision.inference_precision(None, "cpu") == precision.inference_precision("32-true", "cpu") == "32-true"
    assert precision.inference_precision("bf16-mixed", "cpu") == "bf16-mixed"


@pytest.mark.parametrize("setting", ["32-true", "bf16-mixed"])
def test_inference_runs_in_the_prediction_precision_and_returns_float32(setting):
    from bioflow.tasks import create_task

    config = compose_config("task=stardist", "model.depth=1", "model.base_channels=4", "task.features=4",
                            "task.head_features=0", "task.stem_channels=4", f"predict.precision={setting}")
    task = create_task(config, {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": {}}).eval()
    seen = []
    task.model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.no_grad():
        out = task(torch.rand(1, 1, 32, 32))
    assert out.dtype == torch.float32
    assert seen == [torch.bfloat16 if setting == "bf16-mixed" else torch.float32]
    with pytest.raises(ConfigError, match=r"predict\.precision"):
        validate(compose_config("task=stardist", "predict.precision=16-true"))
