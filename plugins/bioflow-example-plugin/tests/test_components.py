"""The example components against hand-made cases and independent references."""

import numpy as np
import pytest
import torch

from bioflow_example_plugin.losses import TverskyLoss
from bioflow_example_plugin.nets import DilatedResNet
from bioflow_example_plugin.split import DistanceSplit


def test_tversky_with_equal_weights_is_the_dice_loss():
    from bioflow.losses.segmentation import DiceLoss

    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    tversky = TverskyLoss(alpha=0.5, beta=0.5, smooth=0.0, include_background=True)(logits, target)
    dice = DiceLoss(smooth=0.0, include_background=True)(logits, target)
    assert tversky.item() == pytest.approx(dice.item(), abs=1e-6)


def test_tversky_by_hand():
    # one pixel of class 1 predicted with p = 0.75, one pixel of class 0 with p(class 1) = 0.25
    logits = torch.log(torch.tensor([[[[0.25, 0.75]], [[0.75, 0.25]]]]))  # (1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    tp, fp, fn = 0.75, 0.25, 0.25  # class 1 soft counts
    expected = 1 - tp / (tp + 0.3 * fp + 0.7 * fn)
    assert TverskyLoss(0.3, 0.7, smooth=0.0)(logits, target).item() == pytest.approx(expected)


@pytest.mark.parametrize("dims", [2, 3])
def test_split_separates_touching_balls_along_the_line_between_them(dims):
    (output,) = DistanceSplit.bioflow_example_inputs(dims)
    labels = DistanceSplit(min_distance=4)(output)
    assert labels.max() == 2
    assert np.array_equal(labels > 0, output[1] > 0.5)
    # every pixel belongs to the ball whose centre is nearer (centres at x = 12 and x = 27)
    x = np.indices(labels.shape)[-1]
    fg = labels > 0
    left = labels[fg & (x < 18)]
    right = labels[fg & (x > 21)]
    assert len(set(left)) == 1 and len(set(right)) == 1 and set(left) != set(right)


def test_separate_regions_without_peaks_still_become_instances():
    fg = np.zeros((30, 30), np.float32)
    fg[2:4, 2:28] = 0.9  # a thin bar: its only peaks lie along its middle row
    fg[10:20, 10:20] = 0.9
    labels = DistanceSplit(min_distance=20, min_size=1)(np.stack([1 - fg, fg]))
    assert labels.max() >= 2 and np.array_equal(labels > 0, fg > 0.5)


def test_receptive_field_matches_a_gradient_probe():
    from bioflow.inference.receptive_field import probe_receptive_field

    net = DilatedResNet(1, 1, width=4, blocks=3, max_dilation=4)
    assert probe_receptive_field(net, 1, 2) == net.receptive_field()


def test_field_classifier_reads_occupancy_from_masks_and_pools_the_evidence():
    from bioflow.tasks import create_task
    from bioflow.testing import compose_config

    config = compose_config("task=field_classifier", "task.min_pixels=3", "model.depth=1", "model.base_channels=4")
    task = create_task(config, {"in_channels": 1, "spatial_dims": 2})
    labels = torch.zeros(3, 8, 8, dtype=torch.long)
    labels[1, :1, :2] = 5  # two pixels: not enough
    labels[2, 2:4, 2:4] = 1  # four pixels: occupied
    assert task.occupied(labels).tolist() == [0, 0, 1]
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 1, 3, 0] = 7.0
    maps[0, 0] = -1.0
    assert task.field_logits(maps).tolist() == [[-1.0, 7.0]]
