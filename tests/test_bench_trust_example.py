"""bench/trust_example.py in its smoke mode: it runs and reports both kinds of held-out images."""

from __future__ import annotations

import importlib.util
import math

from tests.helpers import REPO


def test_the_trust_example_runs_in_smoke_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("bench_trust_example", REPO / "bench" / "trust_example.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--project-dir", str(tmp_path / "p")])
    for kind in ("blobs", "filaments"):
        row = result[kind]
        assert all(math.isfinite(row[k]) for k in ("psnr", "observed_rmse", "predicted_std", "tta_spread", "fit_score"))
        assert row["predicted_std"] > 0 and 0 <= row["fit_flagged"] <= 1 and 0 <= row["beyond_3_std"] <= 1
