"""Batch norm folded into the preceding convolution: the same outputs in evaluation, by hand and by net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bioflow.models.folding import fold_batch_norms
from bioflow.models.unet import UNet


def test_one_channel_by_hand():
    conv = nn.Conv2d(1, 1, 1, bias=True)
    norm = nn.BatchNorm2d(1, eps=0.0)
    with torch.no_grad():
        conv.weight.fill_(2.0), conv.bias.fill_(1.0)
        norm.running_mean.fill_(3.0), norm.running_var.fill_(4.0), norm.weight.fill_(0.5), norm.bias.fill_(-1.0)
    folded = fold_batch_norms(nn.Sequential(conv, norm).eval())
    # (2x + 1 - 3) / 2 * 0.5 - 1 = 0.5x - 1.5
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].weight.item() == pytest.approx(0.5) and folded[0].bias.item() == pytest.approx(-1.5)
    assert torch.allclose(folded(torch.tensor([[[[4.0]]]])), torch.tensor(0.5))


@pytest.mark.parametrize("dims", [2, 3])
def test_a_trained_unet_gives_the_same_outputs_folded(dims):
    torch.manual_seed(0)
    net = UNet(2, 3, spatial_dims=dims, depth=2, base_channels=4, norm="batch")
    x = torch.randn(3, 2, *([16] * dims))
    net.train()
    for _ in range(3):  # running statistics away from their start
        net(x * 3 + 1)
    net.eval()
    folded = fold_batch_norms(net)
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d) for m in net.modules())  # the original is kept
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-5)


def test_the_task_predicts_with_a_folded_copy_made_again_when_the_weights_change():
    from bioflow.tasks import create_task
    from bioflow.testing import compose_config

    config = compose_config("task=stardist", "model.depth=1", "model.base_channels=4", "task.features=4",
                            "task.head_features=0", "task.stem_channels=4")
    task = create_task(config, {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": {}}).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        first = task(x)
        copy = task.inference_network()
        assert copy is not task.model and task.inference_network() is copy
        torch.testing.assert_close(first, task.model(x.contiguous(memory_format=torch.channels_last)), rtol=1e-4, atol=1e-5)
        next(task.model.parameters()).add_(0.5)  # a training step changed the weights
        assert task.inference_network() is not copy
        torch.testing.assert_close(task(x), task.model(x.contiguous(memory_format=torch.channels_last)), rtol=1e-4, atol=1e-5)
    assert task(x).requires_grad  # with gradients: the network itself


def test_nothing_to_fold_or_nothing_to_copy_gives_the_module_itself():
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    assert fold_batch_norms(plain) is plain

    class Uncopyable(nn.Sequential):
        def __deepcopy__(self, memo):
            raise TypeError("holds an open file")

    net = Uncopyable(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    assert fold_batch_norms(net) is net
