"""CARE and Noise2Void tasks: units, target normalisation, blind-spot loss, per-rank masks, PSNR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.data.module import BioflowDataModule
from bioflow.tasks import create_task, get_task
from bioflow.tasks.restoration import N2VTask, _ImageQuality, to_units
from bioflow.testing import compose_config

TINY = ["data.source.n_images=5", "data.source.shape=[64,64]", "data.patch_size=[32,32]", "model.base_channels=4"]


def build(experiment: str, *extra: str):
    config = compose_config(f"experiment={experiment}", *TINY, *extra)
    cls = get_task(config["task"]["name"])
    data = BioflowDataModule(config["data"], config["sampler"], 0, cls.target_kind, None)
    data.prepare()
    info = {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": data.split}
    return create_task(config, info), data


def test_to_units_inverts_the_normalisation():
    from bioflow.data.normalize import PercentileNorm

    raw = np.random.default_rng(0).gamma(2, 50, (2, 20, 20)).astype(np.float32)
    norm = PercentileNorm.fit(raw)
    back = to_units(torch.from_numpy(norm(raw)), torch.from_numpy(np.stack([norm.low, norm.high])))
    np.testing.assert_allclose(back.numpy(), raw, rtol=1e-5, atol=1e-3)


def test_care_targets_are_normalised_with_their_input():
    task, data = build("demo_care")
    sample = data.train_dataloader().dataset[(0, 1)]
    record = data.splits["train"][int(data.train_dataloader().dataset.index.record_ids[0])]
    low, high = sample["norm"]
    # the target patch, brought back to units with the *input's* mapping, holds clean intensities
    target_units = sample["target"] * (high - low) + low
    assert target_units.min() >= -1e-3 and target_units.max() <= record.target.max() + 1e-3


def test_n2v_training_uses_no_target_and_the_loss_sees_only_blind_spots():
    task, data = build("demo_n2v")
    batch = next(iter(data.train_dataloader()))
    assert "target" not in batch  # self-supervised: clean images are for evaluation only
    seen = {}

    def keep_mask(module, args, output):
        seen["masked"], seen["mask"] = output

    def keep_output(module, args, output):
        output.retain_grad()
        seen["output"] = output

    handles = [task.masking.register_forward_hook(keep_mask), task.model.register_forward_hook(keep_output)]
    task.training_step(batch, 0).backward()
    for handle in handles:
        handle.remove()
    gradient = seen["output"].grad
    assert torch.equal(gradient != 0, seen["mask"])  # the loss reads the output at the blind spots only
    assert torch.equal(seen["masked"][~seen["mask"]], batch["image"][~seen["mask"]])


def test_ranks_draw_different_masks(monkeypatch):
    task, _ = build("demo_n2v")
    image = torch.rand(2, 1, 64, 64)
    masks = []
    for rank in (0, 1):
        monkeypatch.setattr(N2VTask, "global_rank", property(lambda self, r=rank: r))
        task._generators.clear()
        masks.append(task.masking(image, generator=task._generator("train"))[1])
    assert not torch.equal(masks[0], masks[1])
    task._generators.clear()
    again = task.masking(image, generator=task._generator("train"))[1]
    assert torch.equal(again, masks[1])  # same rank, same seed: the same masks


def test_psnr_and_ssim_by_hand():
    quality = _ImageQuality()
    target = torch.rand(1, 32, 32) * 200
    quality.update(target + 5.0, target, data_range=255.0)  # constant error of 5: MSE 25
    scores = quality.compute()
    assert scores["psnr"].item() == pytest.approx(10 * np.log10(255**2 / 25), abs=1e-3)
    assert scores["ssim"].item() > 0.99


def test_a_probabilistic_task_predicts_a_location_and_a_scale_with_the_likelihood_of_its_point_loss():
    from bioflow.losses.likelihood import LaplaceNLL, MaskedGaussianNLL

    care, _ = build("demo_care", "task.probabilistic=true")
    assert care.out_channels() == 2 and isinstance(care.loss_fn, LaplaceNLL)  # mae -> Laplace
    assert [o.name for o in care.prediction_outputs()] == ["restored", "uncertainty"]
    n2v, _ = build("demo_n2v", "task.probabilistic=true")
    assert isinstance(n2v.loss_fn, MaskedGaussianNLL)  # masked_mse -> Gaussian at the blind spots
    plain, _ = build("demo_care")
    assert plain.out_channels() == 1 and "calibration_knots" not in plain.state_dict()  # older checkpoints load


def test_likelihood_and_probabilistic_settings_must_agree():
    from bioflow.errors import ConfigError
    from bioflow.registry import registry

    with pytest.raises(ConfigError, match="task.probabilistic=true"):
        build("demo_care", "loss=laplace_nll")

    class PlainLoss(torch.nn.Module):
        bioflow_targets = ("image",)

        def forward(self, prediction, target):
            return (prediction - target).abs().mean()

    registry.register("losses", "plain_for_test", PlainLoss)
    try:
        with pytest.raises(ConfigError, match="no likelihood form"):
            build("demo_care", "task.probabilistic=true", "loss.name=plain_for_test")
    finally:
        registry.unregister("losses", "plain_for_test")


def test_recalibration_on_validation_brings_the_std_to_the_errors():
    task, data = build("demo_care", "task.probabilistic=true")
    found = task.after_fit(data)
    assert found["calibration_after"] < min(0.2, found["calibration_before"])
    assert not torch.allclose(task.calibration_knots[0], task.calibration_knots[1])  # a correction was stored
