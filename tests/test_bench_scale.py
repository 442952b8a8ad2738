"""bench/scale.py in its smoke mode: volumes of two sizes, one process against two, same outputs."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import REPO


def test_the_scale_bench_runs_in_smoke_mode():
    pytest.importorskip("ome_zarr")
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke"])
    assert [row["voxels"] for row in result["memory"]] == [8 * 64 * 64, 16 * 96 * 96]
    assert all(row["peak_rss_mib"] > 0 and row["seconds"] > 0 for row in result["memory"])
    assert [row["processes"] for row in result["processes"]] == [1, 2]
    assert result["identical_outputs"] is True
