"""The StarDist task: targets, network geometry, TTA ray permutations, global NMS over strips, loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
from bioflow.metrics.matching import match_instances
from bioflow.stardist.loss import StarDistLoss
from bioflow.stardist.nms import instances_from_prediction
from bioflow.stardist.targets import object_probabilities, star_distances
from bioflow.tasks import create_task
from bioflow.tasks.stardist import StarDistTask, _ray_permutation_map
from bioflow.testing import compose_config


def make_task(**settings) -> StarDistTask:
    overrides = ["task=stardist", "loss=stardist", "model.depth=2", "model.base_channels=4", "task.features=8"]
    overrides += [f"task.{k}={v}" for k, v in settings.items()]
    info = {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": {}}
    return create_task(compose_config(*overrides), info)


def labels_image(shape=(96, 96), index=0) -> np.ndarray:
    return synthetic_nuclei_image(shape, seed=7, index=index)[1].astype(np.int64)


def test_loss_target_is_prob_dists_and_validity_on_the_grid():
    task = make_task(grid="[2,2]", n_rays=16)
    labels = torch.from_numpy(labels_image())
    padded = labels.clone()
    padded[:, 80:] = -1  # padding of a patch at the image border
    target = task.loss_target(torch.stack([labels, padded]))
    assert target.shape == (2, 1 + 16 + 1, 48, 48)
    np.testing.assert_allclose(target[0, 0].numpy(), object_probabilities(labels.numpy(), (2, 2)))
    np.testing.assert_allclose(target[0, 1:17].numpy(), np.moveaxis(star_distances(labels.numpy(), 16, (2, 2)), -1, 0))
    assert target[0, -1].all() and not target[1, -1, :, 40:].any() and target[1, -1, :, :40].all()


@pytest.mark.parametrize(("pool_first", "multiple"), [(True, 8), (False, 4)])
def test_network_output_is_on_the_grid_and_tiling_with_a_stride_matches_whole_image(pool_first, multiple):
    """Pooled first, the backbone (depth 2) runs at half resolution: sizes must divide by 2 * 4."""
    torch.manual_seed(0)
    task = make_task(grid="[2,2]", pool_first=pool_first, stem_channels=4, head_features=8).eval()
    assert task.size_multiple == multiple
    assert (task.model.stem is not None) == pool_first
    x = torch.randn(1, 100, 84)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x[None], (0, -84 % multiple, 0, -100 % multiple), mode="reflect")
        whole = task(padded)[0][:, :50, :42]
        tiled = task.predict_image(x)
        from bioflow.inference.tiling import minimum_overlap, predict_tiled

        rf = task.receptive_field()
        small_tiles = predict_tiled(task, x, (64, 64), (minimum_overlap(rf),) * 2, rf, multiple, stride=(2, 2))
    assert whole.shape == tiled.shape == (1 + 32, 50, 42)
    assert (tiled - whole).abs().max() < 1e-4
    assert (small_tiles - whole).abs().max() < 1e-4


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_tta_channel_map_turns_ray_distances_back(k, flip):
    """Distances computed on a flipped/turned image, turned back and permuted, equal the originals."""
    labels = torch.from_numpy(labels_image((64, 64), index=1))
    original = torch.from_numpy(star_distances(labels.numpy(), 32)).permute(2, 0, 1)
    x = torch.flip(labels, (1,)) if flip else labels
    x = torch.rot90(x, k, (0, 1))
    dists = torch.from_numpy(star_distances(x.numpy(), 32)).permute(2, 0, 1)
    back = torch.rot90(dists[None], -k, (2, 3))
    back = torch.flip(back, (3,)) if flip else back
    output = torch.cat([torch.zeros(1, 1, 64, 64), back], dim=1)  # channel 0 is the probability
    mapped = _ray_permutation_map(32)(output, k, flip)[0, 1:]
    close = (mapped - original).abs() < 1e-3
    assert close.float().mean() > 0.995  # float32 ray walks may round a near-tie step differently
    assert torch.equal(_ray_permutation_map(32)(output, 0, False), output)


def test_tta_needs_rays_divisible_by_four():
    from bioflow.errors import ConfigError

    with pytest.raises(ConfigError, match="divisible by 4"):
        _ray_permutation_map(30)(torch.zeros(1, 31, 4, 4), 1, False)


def exact_output(labels: np.ndarray, grid=(1, 1), n_rays=32) -> torch.Tensor:
    """Raw network output that predicts the exact targets (probability as a logit)."""
    prob = object_probabilities(labels, grid).clip(1e-6, 1 - 1e-6)
    dists = np.moveaxis(star_distances(labels, n_rays, grid), -1, 0)
    return torch.from_numpy(np.concatenate([np.log(prob / (1 - prob))[None], dists]).astype(np.float32))


@pytest.mark.parametrize("grid", [(1, 1), (2, 2)])
def test_global_nms_over_strips_equals_nms_of_the_whole_output(grid):
    task = make_task(grid=f"[{grid[0]},{grid[1]}]")
    labels = labels_image((160, 120), index=2)
    raw = exact_output(labels, grid)
    session = task.prediction_session(labels.shape)
    for start in range(0, raw.shape[1], 7):  # uneven strips
        session.block(start, raw[:, start:start + 7])
    streamed = session.finish()["labels"]
    whole, _ = instances_from_prediction(torch.sigmoid(raw[0]), raw[1:].permute(1, 2, 0), 0.5, 0.4, grid, labels.shape)
    assert np.array_equal(streamed, whole.numpy() if isinstance(whole, torch.Tensor) else whole)
    assert match_instances(labels, streamed, [0.5])[0.5].accuracy >= 0.95


def test_postprocess_of_exact_targets_gives_the_labels_back():
    task = make_task(grid="[2,2]")
    labels = labels_image((128, 128), index=3)
    predicted = task.decode(exact_output(labels, (2, 2)), labels.shape).numpy()
    assert match_instances(labels, predicted, [0.5])[0.5].accuracy >= 0.9


def test_loss_by_hand():
    prediction = torch.zeros(1, 3, 1, 2)  # logit 0 -> p = 0.5; distances 0
    target = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]], [[4.0, 0.0]], [[1.0, 1.0]]]])  # prob, 2 rays, valid
    bce = -np.log(0.5)
    # weighted by the target prob: error 1.0 * (2 + 4) over 2 rays, per valid pixel (2) or per unit of prob (1)
    by_pixels = StarDistLoss(prob_weight=1.0, dist_weight=0.2, dist_norm="pixels", background_reg=0)
    assert by_pixels(prediction, target).item() == pytest.approx(bce + 0.2 * 6 / (2 * 2))
    by_prob = StarDistLoss(dist_norm="prob", background_reg=0)
    assert by_prob(prediction, target).item() == pytest.approx(bce + 0.2 * 6 / (2 * 1))
    # distances predicted on the background pixel cost only through the background term
    prediction[0, 1:, 0, 1] = torch.tensor([1.0, -3.0])
    assert by_prob(prediction, target).item() == pytest.approx(bce + 0.2 * 6 / 2)
    regularised = StarDistLoss(dist_norm="prob", background_reg=0.01)
    assert regularised(prediction, target).item() == pytest.approx(bce + 0.2 * 6 / 2 + 0.01 * (1 + 3) / (2 * 2))
    target[..., 1] = 0  # second pixel padded: counts nowhere
    assert regularised(prediction, target).item() == pytest.approx(bce + 0.2 * 6 / 2)
    assert by_pixels(prediction, target).item() == pytest.approx(bce + 0.2 * 6 / 2)


def test_stardist_refuses_3d_data():
    from bioflow.errors import ConfigError

    info = {"in_channels": 1, "spatial_dims": 3, "pixel_size": None, "split": {}}
    with pytest.raises(ConfigError, match="2D"):
        create_task(compose_config("task=stardist", "loss=stardist"), info)


def test_the_stem_pools_before_its_second_relu_with_the_same_values_and_gradients():
    from bioflow.stardist.model import GridStem

    stem = GridStem(1, 3, (2, 2))
    conv1, conv2 = stem[0], stem[2]
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    reference = torch.nn.functional.max_pool2d(torch.relu(conv2(torch.relu(conv1(x)))), 2)
    out = stem(x)
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, conv1.weight, conv2.weight], grad)
    want = torch.autograd.grad(reference, [x, conv1.weight, conv2.weight], grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_training_loader_makes_the_loss_target_that_the_step_would_make(workers):
    from bioflow.data.module import BioflowDataModule
    from bioflow.tasks import get_task

    config = compose_config("experiment=demo_stardist", "data.source.n_images=4", "data.source.shape=[64,64]",
                            "data.patch_size=[32,32]", "data.batch_size=3", f"data.num_workers={workers}",
                            "model.depth=2", "model.base_channels=4", "task.features=8")
    cls = get_task(config["task"]["name"])
    data = BioflowDataModule(config["data"], config["sampler"], 0, cls.target_kind, None)
    data.prepare()
    task = create_task(config, {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": data.split})
    data.loader_target = task.loader_loss_target()
    batch = next(iter(data.train_dataloader()))
    expected = task.loss_target(batch["target"])
    assert batch["loss_target"].shape == expected.shape == (3, 2 + task.n_rays, 16, 16)
    torch.testing.assert_close(batch["loss_target"], expected)
    assert float(expected[:, 0].max()) == 1.0  # the patches show nuclei
    inputs, target = task.training_pair(batch)
    assert target is batch["loss_target"] and inputs is batch["image"]
    del batch["loss_target"]
    torch.testing.assert_close(task.training_pair(batch)[1], expected)  # without it: made in the step
