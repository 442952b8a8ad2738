"""Calibration of a predicted per-pixel standard deviation against the errors actually made.

A model that predicts a standard deviation ``s`` for each pixel is calibrated when, among pixels
with about the same ``s``, the root-mean-square error of its prediction is ``s``. Measured here
as in regression-calibration practice (reliability diagrams of predicted std against observed
RMSE):

- the pixels are sorted by predicted std and cut into ``bins`` bins of equal count;
- per bin, the mean predicted std (root of the mean predicted variance) and the observed RMSE;
- one summary number, the mean absolute log ratio of observed to predicted RMSE over the bins
  (0: calibrated; 0.22: off by a factor of about 1.25 on average), and the largest ratio error.

A recalibration maps predicted std to calibrated std: a monotone, piecewise log-linear function
through the (predicted, observed) points of the bins of a held-out split, made monotone by pooling
adjacent violators, beyond its ends a constant ratio. It is stored with the model as ``knots``
(2, K): predicted std and calibrated std at K points; the identity has equal rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Bins of equal count used to measure and to recalibrate.
BINS = 10


@dataclass(frozen=True)
class Calibration:
    """Predicted std against observed RMSE in bins of equal count, and their summary."""

    predicted: np.ndarray   # mean predicted std per bin (root of the mean variance)
    observed: np.ndarray    # observed RMSE per bin
    count: np.ndarray       # pixels per bin

    @property
    def ratios(self) -> np.ndarray:
        """Observed RMSE over predicted std per bin (1: calibrated)."""
        return self.observed / np.maximum(self.predicted, 1e-12)

    @property
    def mean_abs_log_ratio(self) -> float:
        return float(np.mean(np.abs(np.log(np.maximum(self.ratios, 1e-12)))))

    @property
    def worst_ratio_error(self) -> float:
        """The largest relative deviation ``|observed / predicted - 1|`` over the bins."""
        return float(np.max(np.abs(self.ratios - 1)))

    def summary(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}calibration_mean_abs_log_ratio": self.mean_abs_log_ratio,
                f"{prefix}calibration_worst_ratio_error": self.worst_ratio_error}

    def table(self) -> list[dict[str, float]]:
        return [{"predicted_std": float(p), "observed_rmse": float(o), "ratio": float(r), "pixels": int(c)}
                for p, o, r, c in zip(self.predicted, self.observed, self.ratios, self.count)]


def calibration(std: np.ndarray, error: np.ndarray, bins: int = BINS) -> Calibration:
    """Bin ``std`` (predicted, per pixel) and ``error`` (prediction minus truth) into equal-count bins."""
    std, error = np.asarray(std, np.float64).ravel(), np.asarray(error, np.float64).ravel()
    keep = np.isfinite(std) & np.isfinite(error)
    std, error = std[keep], error[keep]
    if std.size < bins:
        raise ValueError(f"{std.size} pixels cannot fill {bins} calibration bins")
    order = np.argsort(std, kind="stable")
    parts = np.array_split(order, bins)
    predicted = np.array([np.sqrt(np.mean(std[p] ** 2)) for p in parts])
    observed = np.array([np.sqrt(np.mean(error[p] ** 2)) for p in parts])
    return Calibration(predicted, observed, np.array([p.size for p in parts]))


def identity_knots(points: int = BINS) -> torch.Tensor:
    """Knots of the identity recalibration (calibrated std = predicted std)."""
    x = torch.logspace(-4, 1, points, dtype=torch.float64)
    return torch.stack([x, x]).float()


def fit_knots(measured: Calibration) -> torch.Tensor:
    """Knots of the monotone recalibration through the bins of ``measured`` (pooled adjacent violators)."""
    x = np.maximum(measured.predicted, 1e-12)
    y = np.maximum(measured.observed, 1e-12)
    weights = measured.count.astype(np.float64)
    # pool adjacent violators on the observed variance, weighted by pixel count
    values, sizes, spans = list(y ** 2), list(weights), [[i] for i in range(len(y))]
    i = 0
    while i < len(values) - 1:
        if values[i] > values[i + 1]:
            total = sizes[i] + sizes[i + 1]
            values[i] = (values[i] * sizes[i] + values[i + 1] * sizes[i + 1]) / total
            sizes[i], spans[i] = total, spans[i] + spans[i + 1]
            del values[i + 1], sizes[i + 1], spans[i + 1]
            i = max(i - 1, 0)
        else:
            i += 1
    fitted = np.empty_like(y)
    for value, span in zip(values, spans):
        fitted[span] = np.sqrt(value)
    # bins of one and the same predicted std get one calibrated std (their pooled variance): a
    # prediction cannot map to two values, and a step between knots nudged apart below would
    # turn rounding of the prediction into jumps of the calibrated std
    for same in np.split(np.arange(len(x)), np.flatnonzero(np.diff(x) > 0) + 1):
        if len(same) > 1:
            fitted[same] = np.sqrt(np.sum(fitted[same] ** 2 * weights[same]) / max(np.sum(weights[same]), 1e-12))
    # strictly increasing predicted knots (bins of one constant prediction are nudged apart), so
    # that the knots keep their shape (BINS points) for the model's state
    x = np.maximum.accumulate(x) * (1 + 1e-6 * np.arange(len(x)))
    return torch.tensor(np.stack([x, fitted]), dtype=torch.float32)


def recalibrate(std: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Calibrated std for predicted ``std`` through ``knots`` (log-log interpolation, constant ratio outside)."""
    knots = knots.to(std.device)
    lx, ly = knots[0].clamp(min=1e-12).log(), knots[1].clamp(min=1e-12).log()
    ls = std.clamp(min=1e-12).log()
    if lx.numel() == 1:
        return std * (ly[0] - lx[0]).exp()
    index = torch.searchsorted(lx.contiguous(), ls.reshape(-1).contiguous()).clamp(1, lx.numel() - 1).reshape(ls.shape)
    x0, x1, y0, y1 = lx[index - 1], lx[index], ly[index - 1], ly[index]
    t = (ls - x0) / (x1 - x0).clamp(min=1e-12)
    inside = y0 + t * (y1 - y0)
    below = ls + (ly[0] - lx[0])
    above = ls + (ly[-1] - lx[-1])
    out = torch.where(ls < lx[0], below, torch.where(ls > lx[-1], above, inside))
    return out.exp()


def write_calibration_report(tables: dict[str, Calibration], distribution: str, folder) -> list:
    """The calibration plot (``calibration.png``: observed RMSE against predicted std per bin, as
    trained and recalibrated on validation, and on the test) and its tables (``calibration.json``)
    written into ``folder``; returns their paths."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    low, high = np.inf, 0.0
    for key, label in (("val_before", "validation, as trained"), ("val_after", "validation, recalibrated"),
                       ("test", "test, recalibrated")):
        table = tables.get(key)
        if table is None:
            continue
        ax.loglog(table.predicted, table.observed, marker="o", label=label)
        low, high = min(low, table.predicted.min(), table.observed.min()), max(high, table.predicted.max(), table.observed.max())
    ax.plot([low, high], [low, high], color="gray", linestyle="--", label="calibrated")
    ax.set_xlabel("predicted std (normalised units)")
    ax.set_ylabel("observed RMSE")
    ax.set_title(f"Calibration of the {distribution} std, {len(table.predicted)} equal-count bins")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(folder) / "calibration.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written = Path(folder) / "calibration.json"
    written.write_text(json.dumps({"distribution": distribution, "units": "normalised",
                                   **{k: t.table() for k, t in tables.items()}}, indent=1))
    return [path, written]
