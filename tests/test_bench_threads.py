"""bench/threads.py's summary of its rounds (its smoke run is in test_bench_smoke.py)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import REPO


def bench():
    spec = importlib.util.spec_from_file_location("bench_threads_summary", REPO / "bench" / "threads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_round_is_divided_by_the_quiet_measurement_of_the_same_round():
    """Ratios pair rounds (not medians of the conditions), a failed process drops its round's pair
    and is counted, and a condition not run reports nothing."""
    summarise = bench().summarise
    quiet = [{"seconds": 1.0, "threads": 2}, {"seconds": 2.0, "threads": 2}, {"seconds": 4.0, "threads": 2},
             {"error": "boom"}]
    loaded_one = [{"seconds": 1.2, "threads": 2}, {"seconds": 3.0, "threads": 2}, {"error": "late"},
                  {"seconds": 9.0, "threads": 2}]
    entry = summarise({"quiet": quiet, "loaded_one": loaded_one})
    assert entry["loaded_one_over_quiet_rounds"] == [1.2, 1.5]  # rounds 3 and 4 lost one side each
    assert entry["loaded_one_over_quiet"] == pytest.approx(1.35)
    # dividing the medians would give 3.0 / 2.0 = 1.5: the pairing is what is measured
    assert entry["loaded_one"]["median_s"] == 3.0 and entry["quiet"]["median_s"] == 2.0
    assert entry["quiet"]["seconds_rounds"] == [1.0, 2.0, 4.0, None]
    assert entry["quiet"]["spread_s"] == [1.0, 4.0] and entry["quiet"]["threads"] == 2
    assert entry["quiet"]["failed"] == 1 and entry["quiet"]["error"] == "boom"
    assert entry["loaded_one"]["failed"] == 1 and entry["loaded_one"]["error"] == "late"
    assert entry["loaded"] == {"median_s": None, "spread_s": None, "seconds_rounds": [], "threads": None}
    assert entry["loaded_over_quiet"] is None and entry["loaded_over_quiet_rounds"] == []


def test_a_process_that_fails_silently_or_prints_no_json_is_an_error_not_a_crash():
    module = bench()
    assert module.measure("raise SystemExit(3)", [], "brief") == {"error": "exit status 3, no output"}
    assert module.measure("print('hello')", [], "brief") == {"error": "not JSON: hello"}
    assert module.measure("pass", [], "brief") == {"error": "exit status 0, no output"}
    assert module.measure("import json; print(json.dumps({'seconds': 0.5}))", [], "brief") == {"seconds": 0.5}
