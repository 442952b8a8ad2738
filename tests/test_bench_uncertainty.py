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
    ranked = care["top5_error_ratio_ranked_by"]  # the bench's own ranking reproduces the test's figure
    assert ranked["predicted_std"] == pytest.approx(care["top5_error_ratio"], rel=1e-3)
    assert ranked["oracle_local_rmse_3x3"] >= ranked["oracle_local_rmse_9x9"] > 1


def test_the_real_image_experiments_run_in_smoke_mode(tmp_path, monkeypatch):
    """The real nuclei experiments' plumbing (tiles as training, validation and test pairs; Noise2Void
    tested against the image itself), on a generated image where the stardist package is missing."""
    import numpy as np

    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image

    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("bench_uncertainty_real", REPO / "bench" / "uncertainty.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    image, _ = synthetic_nuclei_image((256, 256), seed=0, index=0)
    monkeypatch.setattr(bench, "nuclei_image", lambda reference_python: np.asarray(image, np.float32) * 200)
    result = bench.main(["--smoke", "--experiments", "real_nuclei_n2v", "--project-dir", str(tmp_path / "p")])
    n2v = result["real_nuclei_n2v"]
    assert "data.split.test=[test_01,test_13,test_20,test_32]" in n2v["overrides"]
    assert len(n2v["bins"]["test"]) == 10 and n2v["distribution"] == "gaussian"
    assert n2v["signal"] is not None and len(n2v["signal"]["bins"]) == 10  # the clean image is there to check against
    assert 0 <= n2v["signal"]["variance_share"] <= 1 and n2v["top5_error_ratio_ranked_by"] is None


def test_several_seeds_are_summarised_per_experiment_and_figure():
    """With several seeds the bench reports each figure per seed, in seed order, with median and range
    (a missing figure, e.g. a skipped experiment's, is left out rather than counted)."""
    spec = importlib.util.spec_from_file_location("bench_uncertainty_summary", REPO / "bench" / "uncertainty.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = {seed: {"overrides": [f"seed={seed}"],
                   "demo_care": {"psnr": {"plain": 30.0 + seed, "probabilistic": 30.0 + 2 * seed, "difference_db": float(seed)},
                                 "top5_error_ratio": 4.0 - seed, "worst_ratio_error": None}}
            for seed in (0, 1, 5)}
    summary = bench.summary(runs)["demo_care"]
    assert summary["difference_db"] == {"values": [0.0, 1.0, 5.0], "median": 1.0, "min": 0.0, "max": 5.0}
    assert summary["top5_error_ratio"]["median"] == 3.0 and summary["top5_error_ratio"]["min"] == -1.0
    assert summary["psnr_probabilistic"]["values"] == [30.0, 32.0, 40.0]
    assert "worst_ratio_error" not in summary and "mean_abs_log_ratio" not in summary
    even = bench.summary({0: runs[0], 1: runs[1]})["demo_care"]
    assert even["difference_db"]["median"] == 0.5
