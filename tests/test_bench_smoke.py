"""Every script in bench/ runs in its smoke mode (``--smoke``: tiny sizes, seconds), so that a bench
that breaks fails the tests instead of rotting until someone needs its figures.

The benches with a test of their own (tests/test_bench_<name>.py) are not run again here; the
others are run in-process through their ``main(argv)``, with every folder they write under the
test's tmp_path (working directory and temporary files included), and their JSON is checked for
the figures the bench is about. The last test fails when a bench has no smoke test anywhere.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import sys
import tempfile
from typing import Callable

import pytest

from tests.helpers import REPO

BENCH = REPO / "bench"
TESTS = REPO / "tests"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def fraction(value) -> bool:
    return isinstance(value, (int, float)) and 0.0 <= value <= 1.0


def skipped(entry) -> bool:
    return isinstance(entry, dict) and set(entry) == {"skipped"} and isinstance(entry["skipped"], str)


def check_cold_start(result: dict) -> None:
    assert positive(result["python_startup_s"])
    assert set(result["commands"]) == {"import bioflow", "bioflow --help", "bioflow plugins"}
    for row in result["commands"].values():
        assert positive(row["median_s"])
        assert isinstance(row["imports_torch"], bool) and isinstance(row["imports_lightning"], bool)


def check_gpu(result: dict) -> None:
    assert result["benchmark"] == "gpu" and (result["cuda"] or result["device"] == "cpu")
    for part in ("stardist_train", "stardist3d_train", "stardist_nms", "n2v_train"):
        assert "error" not in result[part], f"{part}: {result[part].get('error')}"
        assert positive(result[part]["bench_seconds"])
    for part in ("stardist_train", "stardist3d_train"):
        runs = result[part]["runs"]
        assert [run["precision"] for run in runs] == ["32-true", "bf16-mixed"]
        assert all(positive(run["patches_per_s"]) and positive(run["seconds_per_step"])
                   and math.isfinite(run["mean_loss_last_steps"]) for run in runs)
    assert result["stardist_train"]["recommended_precision"] in ("32-true", "bf16-mixed")
    assert positive(result["n2v_train"]["patches_per_s"]) and math.isfinite(result["n2v_train"]["mean_loss_last_steps"])
    nms = result["stardist_nms"]
    assert 0 < nms["cpu"]["kept"] < nms["candidates"] and positive(nms["cpu"]["seconds"])
    if result["cuda"]:
        assert nms["same_kept"] is True
    else:
        assert skipped(nms["cuda"]) and nms["same_kept"] is None


def check_imbalance(result: dict) -> None:
    assert 0 < result["rare_pixel_share"] < 1
    assert result["seeds"] == [0]
    assert result["budget"] == "1 epochs x 8 patches (batch 4)"  # read back from the runs' MLflow params
    assert set(result["results"]) == {"uniform", "class_weighted"}
    for scores in result["results"].values():
        for key in ("iou_rare", "dice_rare", "iou_nucleus"):
            assert len(scores[key]) == 1 and fraction(scores[key][0])
            assert scores[f"{key}_mean"] == scores[key][0] and scores[f"{key}_sd"] == 0.0


def check_n2v_masking(result: dict) -> None:
    assert result["threads"] == 1 and result["unit"] == "ms per batch (median)"
    cpu = result["results"]["cpu"]
    assert cpu["2d"]["shape"] == "2x1x32x32" and cpu["3d"]["shape"] == "1x1x8x32x32"
    for entry in cpu.values():
        assert all(positive(entry[k]) for k in ("uniform", "median", "struct", "unet_train_step"))


def _noisy_psnr_ok(value: float) -> bool:
    # Gaussian noise of sigma 25 on a 0-255 scale: 20 log10(255 / 25) = 20.2 dB (clipping aside)
    return 19.0 < value < 21.5


def check_n2v_speed(result: dict) -> None:
    assert result["threads_per_side"] == 1 and result["rounds"] == 1
    bare = result["bioflow_vs_bare"]
    for key in ("bioflow_patches_per_s", "bare_patches_per_s", "time_ratio_bioflow_over_bare"):
        assert positive(bare[key]["median"]) and bare[key]["min"] <= bare[key]["median"] <= bare[key]["max"]
    # the bare loop trains the very network bioflow builds from the config
    assert bare["parameters"]["bioflow"] == bare["parameters"]["bare"] > 0
    assert skipped(result["training_vs_careamics"])
    prediction = result["prediction"]
    assert positive(prediction["bioflow_pixels_per_s"]["median"]) and "careamics_pixels_per_s" not in prediction


def check_n2v_single_image(result: dict) -> None:
    assert result["size"] == 96 and result["steps"] == 2 and result["sigma"] == 25.0
    contents = result["contents"]
    assert set(contents) == {"nuclei", "blobs", "mixed"}
    ran = [c for c in contents if not skipped(contents[c])]
    assert {"blobs", "mixed"} <= set(ran)
    for content in ran:
        entry = contents[content]
        assert set(entry["runs"]) == {"0"}
        run = entry["runs"]["0"]
        assert _noisy_psnr_ok(run["noisy_psnr"]) and math.isfinite(run["denoised_psnr"])
        assert run["gain_db"] == pytest.approx(run["denoised_psnr"] - run["noisy_psnr"])
        assert positive(run["train_s"]) and run["steps"] == 2
        assert entry["mean_gain_db"] == entry["min_gain_db"] == run["gain_db"]


def check_restoration(result: dict) -> None:
    speed = result["n2v_throughput"]
    assert speed["steps_timed"] == 2
    assert all(positive(speed[k]) for k in ("framework_patches_per_s", "bare_patches_per_s", "framework_s_per_step",
                                            "bare_s_per_step", "overhead_ratio", "masking_ms_per_batch"))
    assert speed["framework_patches_per_s"] == pytest.approx(4 / speed["framework_s_per_step"], rel=0.05)
    [quality] = result["quality"]
    assert quality["image"].startswith("128x128 blobs")
    assert (quality["steps"], quality["batch"], quality["patch"]) == (2, 4, 32)
    assert _noisy_psnr_ok(quality["noisy_psnr"])
    for method in ("n2v", "care"):
        psnr = quality[method]["psnr"]
        assert len(psnr) == 1 and math.isfinite(psnr[0]) and quality[method]["mean"] == psnr[0]
        assert quality[method]["gain_db_mean"] == pytest.approx(psnr[0] - quality["noisy_psnr"], abs=0.02)
    assert positive(quality["prediction_128_tile64_s"]) and positive(quality["prediction_megapixels_per_s"])


def _check_exact_target_nms(result: dict, scenes: dict[str, int | None]) -> None:
    """NMS of exact targets plus mild noise: about one polygon/polyhedron kept per object."""
    for name, objects in scenes.items():
        row = result[f"nms_{name}"]
        if objects is not None:
            assert row["objects"] == objects
        assert 0 < row["objects"] and 0 < row["kept"] < row["candidates"]
        assert positive(row["seconds"]) and positive(row["render_seconds"]) and row["seconds_all"] == [row["seconds"]]
        assert row["accuracy@0.5"] > 0.8
    assert skipped(result["reference"])


def _check_single_round_spreads(result: dict, timed: list[tuple[dict, str]]) -> None:
    for row, key in timed:
        spread = row[f"{key}_spread"]
        assert len(spread["rounds"]) == 1 and spread["min"] == min(spread["rounds"]) and spread["max"] == max(spread["rounds"])
        assert spread["min"] <= row[key] <= spread["max"]
    assert result["targets"]["seconds_spread"]["rounds"] == result["targets"]["seconds_all"]


def check_stardist_nms(result: dict) -> None:
    assert result["settings"]["shape"] == [256, 256] and result["settings"]["n_rays"] == 32
    assert result["targets"]["objects"] == 25 and positive(result["targets"]["seconds"])
    _check_exact_target_nms(result, {"a": 25, "b": 50})
    # medians of --repeats runs (one in smoke mode), each with its spread beside it
    assert result["settings"]["repeats"] == 1
    timed = [(result["targets"], "seconds"), (result["targets"], "star_distances_seconds")]
    timed += [(result[f"nms_{name}"], key) for name in ("a", "b") for key in ("seconds", "render_seconds")]
    _check_single_round_spreads(result, timed)


def check_stardist3d(result: dict) -> None:
    assert result["settings"]["scenes"] == {"a": {"shape": [16, 64, 64], "grid": [1, 4, 4]},
                                            "b": {"shape": [16, 64, 64], "grid": [2, 2, 2]}}
    assert result["targets"]["shape"] == [16, 64, 64] and result["targets"]["objects"] > 0
    assert positive(result["targets"]["seconds"])
    _check_exact_target_nms(result, {"a": None, "b": None})
    assert all(row["distinct_probs"] == row["candidates"] for row in (result["nms_a"], result["nms_b"]))
    # medians of --repeats runs (one in smoke mode), each with its spread beside it
    assert result["settings"]["repeats"] == 1
    timed = [(result["targets"], "seconds")]
    timed += [(result[f"nms_{name}"], key) for name in ("a", "b") for key in ("seconds", "render_seconds")]
    _check_single_round_spreads(result, timed)


def check_stardist3d_predict(result: dict) -> None:
    assert result["tile"] == [8, 32, 32] and result["width"] == 48
    [stack] = result["stacks"]
    assert "error" not in stack, stack.get("error")
    assert stack["depth"] == 16 and stack["voxels"] == 16 * 48 * 48
    assert positive(stack["seconds"]) and positive(stack["peak_rss_mib"]) and stack["label_volume_mib"] >= 0
    assert stack["true_objects"] > 0 and stack["predicted_objects"] >= 0 and fraction(stack["accuracy@0.5"])
    # the median of --repeats fresh processes (one in smoke mode), with its spread beside it
    assert result["repeats"] == 1
    spread = stack["seconds_spread"]
    assert len(spread["rounds"]) == 1 and spread["min"] == min(spread["rounds"]) and spread["max"] == max(spread["rounds"])
    assert spread["min"] <= stack["seconds"] <= spread["max"]


def check_stardist_predict(result: dict) -> None:
    assert result["size"] == "128x128" and result["image"] in ("real", "synthetic")
    if result["image"] == "synthetic":
        assert skipped(result["real_image"])
    ours = result["bioflow"]
    assert ours["candidates"] > 0 and ours["objects_true"] > 0 and ours["objects_found"] >= 0
    assert all(ours[k] >= 0 for k in ("network_and_candidates_s", "nms_and_render_s", "total_s"))
    assert positive(ours["peak_rss_mib"]) and fraction(ours["accuracy@0.5"])
    assert len(ours["thresholds"]) == 2 and skipped(result["reference"])
    # medians of --repeats whole predictions (two in smoke mode), each with its spread beside it
    assert result["repeats"] == 2
    for key in ("network_and_candidates_s", "nms_and_render_s", "total_s"):
        spread = ours[f"{key}_spread"]
        assert len(spread["rounds"]) == 2 and spread["min"] == min(spread["rounds"]) and spread["max"] == max(spread["rounds"])
        assert spread["min"] <= ours[key] <= spread["max"]


def check_stardist_real(result: dict) -> None:
    assert result["shape"] == [128, 128] and result["budget"] == {"batch": 2, "patch": 32, "n_rays": 8, "grid": 2}
    assert all(count > 0 for count in result["objects_per_region"].values())
    run = result["runs"]["2"]["bioflow"]["1"]
    assert "error" not in run, run.get("error")
    scores = run["scores"]
    assert scores["n_true"] == result["objects_per_region"]["test"]
    assert all(fraction(scores[f"{name}@{tau}"]) for name in ("accuracy", "f1", "precision", "recall",
                                                              "panoptic_quality") for tau in (0.5, 0.7))
    assert run["steps"] == 2 and all(positive(run[k]) for k in ("train_step_s", "wall_s", "predict_s"))
    assert 0 < run["prob_thresh"] < 1 and 0 <= run["nms_thresh"] <= 1
    assert result["mean_over_seeds"]["2"]["bioflow"]["accuracy@0.5"] == scores["accuracy@0.5"]
    times = result["step_time"]["2"]
    assert times["bioflow_s_per_step"]["median"] == run["train_step_s"]
    assert "ratio_bioflow_over_reference" not in times  # no reference side ran
    assert skipped(result["reference"])


def check_tiled_prediction(result: dict) -> None:
    assert [row["variant"] for row in result["results"]] == ["cosine", "none", "tta"]
    for row in result["results"]:
        assert row["size"] == "300x300"
        assert positive(row["seconds"]) and positive(row["megapixels_per_s"]) and positive(row["peak_rss_mib"])
        # the median of --repeats fresh processes (one in smoke mode), with its spread beside it
        spread = row["seconds_spread"]
        assert len(spread["rounds"]) == result["repeats"] == 1
        assert spread["min"] == min(spread["rounds"]) and spread["max"] == max(spread["rounds"])
        assert spread["min"] <= row["seconds"] <= spread["max"]


# bench name -> (arguments after --smoke, with {project} and {tmp} filled in; check of its JSON)
def check_threads(result: dict) -> None:
    assert result["benchmark"] == "threads" and result["shape"] == [16, 48, 48]
    targets = result["parts"]["targets3d"]
    for variant in ("spinning", "brief", "sleeping"):
        for condition in ("quiet", "loaded", "loaded_one"):
            entry = targets[variant][condition]
            if condition == "loaded_one" and variant != "brief":
                assert entry["median_s"] is None  # not run in smoke mode
                continue
            assert "error" not in entry, entry.get("error")
            assert positive(entry["median_s"]) and entry["threads"] >= 1
        assert positive(targets[variant]["loaded_over_quiet"])
    assert positive(targets["brief"]["loaded_one_over_quiet"])
    # each round's ratio against the quiet measurement of its own round
    brief = targets["brief"]
    assert len(brief["loaded_one_over_quiet_rounds"]) == result["rounds"] == 1
    expected = brief["loaded_one"]["median_s"] / brief["quiet"]["median_s"]
    assert brief["loaded_one_over_quiet"] == pytest.approx(expected, rel=0.05)
    assert targets["spinning"]["loaded_one_over_quiet_rounds"] == []  # not run in smoke mode
    assert result["variants"] == ["spinning", "brief", "sleeping"]
    assert result["load_threads"]["loaded_one"] == 1
    entry = result["parts"]["epoch_workers2"]["spinning"]["quiet"]
    assert "error" not in entry, entry.get("error")
    assert positive(entry["median_s"]) and entry["threads"] == max(1, targets["sleeping"]["quiet"]["threads"] - 2)
    assert result["parts"]["epoch_workers0"]["spinning"]["quiet"]["median_s"] is None  # not run in smoke mode


CASES: dict[str, tuple[list[str], Callable[[dict], None]]] = {
    "cold_start": ([], check_cold_start),
    "gpu": ([], check_gpu),
    "imbalance": (["--project-dir", "{project}"], check_imbalance),
    "n2v_masking": ([], check_n2v_masking),
    "n2v_single_image": (["--project-dir", "{project}"], check_n2v_single_image),
    "n2v_speed": ([], check_n2v_speed),
    "restoration": ([], check_restoration),
    "stardist3d": ([], check_stardist3d),
    "stardist3d_predict": (["--project-dir", "{project}"], check_stardist3d_predict),
    "stardist_nms": ([], check_stardist_nms),
    "stardist_predict": ([], check_stardist_predict),
    "stardist_real": (["--workdir", "{tmp}/work", "--project-dir", "{project}"], check_stardist_real),
    "tiled_prediction": ([], check_tiled_prediction),
    "threads": ([], lambda result: check_threads(result)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_bench_runs_in_smoke_mode(name, tmp_path, monkeypatch, capsys, project_dir):
    # Nothing outside tmp_path: the working directory, temporary folders (here and in the bench's
    # subprocesses) and the MLflow store (the session's, shared: creating one takes seconds).
    monkeypatch.chdir(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(sys, "path", [*sys.path])  # benches put bench/ first on it: not for the tests after
    extra, check = CASES[name]
    argv = ["--smoke", *(a.format(project=project_dir, tmp=tmp_path) for a in extra)]
    bench = load_bench(name)
    result = bench.main(argv)
    report = json.loads(capsys.readouterr().out)  # what it prints: one JSON object, nothing else
    assert report == json.loads(json.dumps(result)), "the bench prints the result it returns"
    assert report["smoke"] is True
    check(report)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"tmp", *(["work"] if "{tmp}/work" in extra else [])})


def _dedicated_smoke_tests() -> set[str]:
    """Benches with a test file of their own that runs them with --smoke."""
    names = set()
    for path in TESTS.glob("test_bench_*.py"):
        text = path.read_text()
        name = path.stem.removeprefix("test_bench_")
        if (BENCH / f"{name}.py").is_file() and f'"bench" / "{name}.py"' in text and '"--smoke"' in text:
            names.add(name)
    return names


def test_every_bench_has_a_smoke_mode_and_a_smoke_test():
    benches = {path.stem for path in BENCH.glob("*.py")}
    dedicated = _dedicated_smoke_tests()
    assert set(CASES) <= benches, f"smoke cases of benches that are gone: {sorted(set(CASES) - benches)}"
    assert not set(CASES) & dedicated, f"run twice: {sorted(set(CASES) & dedicated)}"
    missing = benches - set(CASES) - dedicated
    assert not missing, (f"benches without a smoke test: {sorted(missing)}; give each a --smoke mode and a "
                         f"case in tests/test_bench_smoke.py")
    for name in sorted(benches):
        text = (BENCH / f"{name}.py").read_text()
        assert '"--smoke"' in text and "def main(argv" in text, f"bench/{name}.py: no --smoke flag or main(argv)"
        assert "--smoke" in (ast.get_docstring(ast.parse(text)) or ""), f"bench/{name}.py: --smoke not in its docstring"
