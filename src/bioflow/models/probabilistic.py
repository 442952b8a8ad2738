"""A probabilistic restoration network as the restored image and its calibrated std, for export.

In training, the network's output holds per channel a location (the restored image) and the log
of a scale; the std is ``std_per_scale * (exp(clamp(r) + log_start) + min_scale)``, then mapped
through the recalibration fitted on validation (monotone, piecewise linear between knots in
log-log space, a constant ratio outside them). Other tools cannot compute that from the format's
post-processing, so the package's network does it: :class:`WithStd` returns location and
calibrated std in a row. It imports only torch (its source is part of the package's architecture).
"""

import torch
from torch import nn


class WithStd(nn.Module):
    """``net``'s output ``(N, 2C, ...)`` of location and log-scale as ``(N, 2C, ...)`` of location and
    calibrated std (normalised units); ``knots`` ``(2, K)``: predicted std -> calibrated std."""

    def __init__(self, net: nn.Module, channels: int, std_per_scale: float, log_range: float, log_start: float,
                 min_scale: float, points: int) -> None:
        super().__init__()
        self.net = net
        self.channels = int(channels)
        self.std_per_scale = float(std_per_scale)
        self.log_range = float(log_range)
        self.log_start = float(log_start)
        self.min_scale = float(min_scale)
        self.register_buffer("knots", torch.ones(2, int(points)))

    def calibrated(self, std: torch.Tensor) -> torch.Tensor:
        """The recalibration: ``ls + c0`` below the first knot, then each segment's slope (a telescoping
        sum of clamped pieces, which TorchScript and ONNX both express)."""
        lx = torch.log(self.knots[0].clamp(min=1e-12))
        ly = torch.log(self.knots[1].clamp(min=1e-12))
        ls = torch.log(std.clamp(min=1e-12))
        out = ls + (ly[0] - lx[0])
        for k in range(int(lx.shape[0]) - 1):
            slope = (ly[k + 1] - ly[k]) / (lx[k + 1] - lx[k]).clamp(min=1e-12)
            out = out + (slope - 1.0) * (torch.minimum(torch.maximum(ls, lx[k]), lx[k + 1]) - lx[k])
        return torch.exp(out)

    def steepest(self) -> float:
        """The largest slope of the recalibration in log-log space (at least 1): how much it
        magnifies a relative change of the predicted std, rounding included."""
        lx = torch.log(self.knots[0].clamp(min=1e-12))
        ly = torch.log(self.knots[1].clamp(min=1e-12))
        slopes = (ly[1:] - ly[:-1]) / (lx[1:] - lx[:-1]).clamp(min=1e-12)
        return max(1.0, float(slopes.abs().max())) if slopes.numel() else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        location, log_scale = out[:, : self.channels], out[:, self.channels:]
        scale = torch.exp(log_scale.clamp(-self.log_range, self.log_range) + self.log_start) + self.min_scale
        return torch.cat([location, self.calibrated(scale * self.std_per_scale)], dim=1)
