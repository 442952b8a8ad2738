"""bench/uncertainty.py in its smoke mode: it runs and reports what it promises (no timing)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.helpers import REPO


def test_the_uncertainty_bench_runs_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("bench_uncertainty", REPO / "bench" / "uncertainty.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--experiments", "demo_care", "--project-dir", str(tmp_path / "p")])
    care = result["demo_care"]
    assert care["distribution"] == "laplace"
    assert all(math.isfinite(care["psnr"][k]) for k in ("plain", "probabilistic"))
    for split in ("val_before", "val_after", "test"):
        assert len(care["bins"][split]) == 10 and all(b["observed_rmse"] > 0 for b in care["bins"][split])
    assert care["worst_ratio_error"] == pytest.approx(max(abs(b["ratio"] - 1) for b in care["bins"]["test"]), rel=1e-5)
