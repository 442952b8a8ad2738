"""bench/fit_check.py in its smoke mode: it runs and reports every shift (no timing, no AUC target)."""

from __future__ import annotations

import importlib.util

from tests.helpers import REPO


def test_the_fit_check_bench_runs_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("bench_fit_check", REPO / "bench" / "fit_check.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.auc([0.1, 0.2], [0.3, 0.4]) == 1.0 and bench.auc([0.1, 0.3], [0.3, 0.0]) == 0.375
    result = bench.main(["--smoke", "--experiments", "demo_care", "--project-dir", str(tmp_path / "p")])
    care = result["demo_care"]
    assert set(care["shifts"]) == {"intensity_x4", "intensity_x0.25", "noise_x3", "pixel_size_x2", "pixel_size_x0.5",
                                   "content"}
    assert all(0 <= s["auc"] <= 1 and 0 <= s["flagged"] <= 1 for s in care["shifts"].values())
    # a per-image-normalised model never sees a pure scaling: its score does not change
    assert care["shifts"]["intensity_x4"]["auc"] == 0.5
