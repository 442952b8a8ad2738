"""The automatic tile: the peak memory of a forward pass, counted by hand for small networks."""

from __future__ import annotations

import torch

from bioflow.inference.predictor import activation_peak_bytes


def test_peak_counts_live_outputs_and_frees_them():
    torch.manual_seed(0)
    probe = torch.zeros(1, 1, 32, 32)  # 4 KiB
    # conv a (8 channels, 32 KiB) -> in-place ReLU (same storage) -> conv b (2 channels, 8 KiB) -> conv c (8 KiB).
    # While b runs: probe + a + b = 44 KiB; a is freed before c runs: probe + b + c = 20 KiB.
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(inplace=True),
                              torch.nn.Conv2d(8, 2, 3, padding=1), torch.nn.Conv2d(2, 2, 3, padding=1))
    assert activation_peak_bytes(net, probe) == (1 + 8 + 2) * 32 * 32 * 4
    # Without the freeing, or with the in-place ReLU counted again, it would be 52 or 84 KiB.


class Skip(torch.nn.Module):
    """A skip connection: the first output stays alive until the end."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(1, 4, 1)
        self.b = torch.nn.Conv2d(4, 4, 1)
        self.c = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        skip = self.a(x)
        y = self.c(self.b(skip))
        return torch.cat([skip, y], dim=1)


def test_peak_keeps_skip_connections_alive():
    probe = torch.zeros(1, 1, 16, 16)  # 1 KiB
    # While c runs, the skip is still alive: probe + skip + b + c (4 KiB each) = 13 KiB. The cat
    # (8 KiB) is an operation of Skip's own forward, seen only when Skip returns, after its locals
    # are freed (probe + cat = 9 KiB): what runs between module outputs is what the factor of 2
    # in auto_tile_size allows for.
    assert activation_peak_bytes(Skip(), probe) == 13 * 1024
    # Without the skip kept alive: probe + b + c = 9 KiB.
