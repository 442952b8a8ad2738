"""The StarDist 3D task: anisotropy, targets, global NMS over strips, exact round trip, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
from bioflow.errors import BioflowError, ConfigError
from bioflow.metrics.matching import match_instances
from bioflow.stardist.nms3d import instances_from_prediction_3d
from bioflow.stardist.rays3d import golden_spiral_rays
from bioflow.stardist.targets3d import object_probabilities_3d, star_distances_3d
from bioflow.tasks import create_task
from bioflow.testing import compose_config

INFO = {"in_channels": 1, "spatial_dims": 3, "pixel_size": [2.0, 0.5, 0.5], "split": {}}


def make_task(info=INFO, **settings):
    overrides = ["task=stardist3d", "model.depth=1", "model.base_channels=4", "task.features=8",
                 "task.head_features=8", "task.stem_channels=4", "task.n_rays=32"]
    overrides += [f"task.{k}={v}" for k, v in settings.items()]
    return create_task(compose_config(*overrides), info)


def volume(shape=(24, 64, 64), index=0):
    image, labels = synthetic_nuclei_image(shape, seed=3, index=index, anisotropy=2.0, radius=(5.0, 8.0))[:2]
    return image.astype(np.float32), labels.astype(np.int64)


def test_anisotropy_comes_from_the_voxel_size_unless_given():
    assert make_task().anisotropy == (4.0, 1.0, 1.0)  # z step 2.0 over pixel size 0.5
    assert make_task(anisotropy="[3,1,1]").anisotropy == (3.0, 1.0, 1.0)
    assert make_task({**INFO, "pixel_size": None}).anisotropy == (1.0, 1.0, 1.0)
    rays = make_task().rays
    assert np.allclose(rays.vertices, golden_spiral_rays(32, anisotropy=(4.0, 1.0, 1.0)).vertices)
    with pytest.raises(ConfigError, match="task.anisotropy"):
        make_task(anisotropy="[1,1]")


def test_loss_target_is_prob_dists_and_validity_on_the_grid():
    task = make_task(grid="[1,2,2]")
    _, labels = volume()
    padded = labels.copy()
    padded[:, :, -8:] = -1  # padding of a patch at the border
    target = task.loss_target(torch.from_numpy(np.stack([labels, padded])))
    assert target.shape == (2, 2 + 32, 24, 32, 32)
    assert np.allclose(target[0, 0].numpy(), object_probabilities_3d(labels, (1, 2, 2), task.anisotropy))
    dists = star_distances_3d(labels, task.rays, (1, 2, 2))
    assert np.allclose(target[0, 1:-1].numpy(), np.moveaxis(dists, -1, 0), atol=1e-5)
    assert target[0, -1].min() == 1 and target[1, -1, :, :, -4:].max() == 0 and target[1, -1, :, :, :-4].min() == 1
    # the data loader's workers make the same target (from a pickled copy of the function)
    import pickle

    in_loader = pickle.loads(pickle.dumps(task.loader_loss_target()))
    torch.testing.assert_close(in_loader(torch.from_numpy(np.stack([labels, padded]))), target)


def exact_output(labels: np.ndarray, task) -> torch.Tensor:
    """The raw output a perfect network would give: logit of the true probability, true distances."""
    prob = object_probabilities_3d(labels, task.grid, task.anisotropy).clip(1e-6, 1 - 1e-6)
    dists = np.moveaxis(star_distances_3d(labels, task.rays, task.grid), -1, 0)
    return torch.from_numpy(np.concatenate([np.log(prob / (1 - prob))[None], dists]).astype(np.float32))


def test_exact_targets_decode_to_the_labels_and_strips_equal_the_whole_volume(monkeypatch):
    import bioflow.stardist.postprocess as postprocess

    task = make_task(grid="[1,2,2]", n_rays=64)
    _, labels = volume((20, 64, 64), index=1)
    raw = exact_output(labels, task)
    whole = task.decode(raw, labels.shape).numpy()
    assert whole.shape == labels.shape and whole.dtype == np.int32
    assert match_instances(labels, whole, [0.5])[0.5].accuracy >= 0.9
    session = task.prediction_session(labels.shape)
    for start in range(0, raw.shape[1], 3):  # uneven slabs along z, one global NMS at the end
        session.block(start, raw[:, start:start + 3])
    monkeypatch.setattr(postprocess, "RENDER_BLOCK_PIXELS", 5 * 64 * 64)  # rendered in slabs of 5 planes
    rendered = session.finish()["labels"]
    assert [start for start, _ in rendered] == [0, 5, 10, 15]
    assert np.array_equal(rendered, whole)
    direct, _ = instances_from_prediction_3d(torch.sigmoid(raw[0]), raw[1:].permute(1, 2, 3, 0), task.rays,
                                             0.5, 0.4, (1, 2, 2), labels.shape)
    assert np.array_equal(direct.numpy(), whole)


def test_validation_and_test_scores_match_whole_volumes():
    task = make_task(grid="[1,2,2]", n_rays=64)
    _, labels = volume((20, 64, 64), index=2)
    raw = exact_output(labels, task)
    task.predict_image = lambda image: raw  # a perfect network
    batch = {"image": torch.zeros(1, 1, *labels.shape), "target": torch.from_numpy(labels)[None], "name": ["v"]}
    task.on_validation_epoch_start()
    expected = match_instances(labels, task.decode(raw, labels.shape).numpy(), [0.5, 0.7])
    for stage in ("val", "test"):
        task.evaluate_image(stage, batch)
        scores = task.metrics[stage].compute()
        for tau in (0.5, 0.7):
            # Objects are counted once per volume, not once per plane they cross.
            assert int(task.metrics[stage].n_true[list(task.metrics[stage].thresholds).index(tau)]) == len(np.unique(labels)) - 1
            assert float(scores[f"accuracy@{tau:g}"]) == pytest.approx(expected[tau].accuracy)


def test_dimensions_are_checked_both_ways():
    with pytest.raises(ConfigError, match="3D and the data are 2D .*task=stardist"):
        make_task({**INFO, "spatial_dims": 2, "pixel_size": None})
    with pytest.raises(ConfigError, match="task.grid: 3 positive integers"):
        make_task(grid="[2,2]")
    info2d = {"in_channels": 1, "spatial_dims": 3, "pixel_size": None, "split": {}}
    with pytest.raises(ConfigError, match="task=stardist3d"):
        create_task(compose_config("task=stardist"), info2d)


def test_tiled_prediction_equals_whole_and_tta_is_refused():
    task = make_task(grid="[1,2,2]").eval()
    image, _ = volume((72, 32, 32))
    x = torch.from_numpy(image[None])
    with torch.no_grad():
        whole = task.predict_image(x)
        parts = []
        # z is cut into tiles (the overlap, the receptive field, makes them exact); y and x are whole
        task.predict_array(image[None], sink=lambda start, raw: parts.append(raw), tile_size=[56, 32, 32], norm=lambda a: a)
    assert len(parts) > 1
    assert torch.allclose(torch.cat(parts, dim=1), whole, atol=1e-4)
    with pytest.raises(BioflowError, match="tta"):
        with torch.no_grad():
            task.predict_array(image[None], sink=lambda start, raw: None, tile_size=[56, 32, 32], tta=True,
                               norm=lambda a: a)
