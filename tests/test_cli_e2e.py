"""End to end: the real CLI trains a tiny experiment into a real sqlite MLflow store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import BIOFLOW, run_cli

TINY = [
    "data.source.n_images=6",
    "data.source.shape=[64,64]",
    "data.patch_size=[32,32]",
    "data.patches_per_epoch=8",
    "data.batch_size=4",
    "model.depth=1",
    "model.base_channels=4",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "logger.experiment_name=e2e",
    "logger.figures.n_samples=2",
]


@pytest.fixture(scope="module")
def trained(project_dir: Path, tmp_path_factory):
    """One tiny training job, started from a folder other than the project folder."""
    workdir = tmp_path_factory.mktemp("cwd")
    result = run_cli("train", *TINY, f"project_dir={project_dir}", cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{project_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    return result, client, runs, project_dir


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_one_job_is_exactly_one_run(trained):
    _, _, runs, _ = trained
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"


def test_run_has_params_tags_metrics_and_artifacts(trained):
    _, client, runs, project_dir = trained
    run = runs[0]
    params = run.data.params
    assert params["model.depth"] == "1"
    assert params["data.source.name"] == "synthetic_nuclei"
    assert params["project_dir"] == str(project_dir)
    tags = run.data.tags
    assert tags["bioflow.component.model"] == "bioflow:unet"
    assert tags["bioflow.plugin.bioflow"]
    assert tags["bioflow.receptive_field_px"] == "18"  # depth-1 U-Net
    assert 10 < float(tags["bioflow.object_size_median_px"]) < 30  # nuclei of radius 6 to 12 px
    metrics = run.data.metrics
    for key in ("train/loss", "val/loss", "val/dice_foreground", "val/iou_mean", "test/dice_fg_mean", "test/iou_foreground"):
        assert key in metrics, key
    history = client.get_metric_history(run.info.run_id, "val/dice_fg_mean")
    assert len(history) == 2  # one point per epoch, logged once
    artifacts = artifact_paths(client, run.info.run_id)
    assert "checkpoints/best.ckpt" in artifacts
    assert "config.yaml" in artifacts and "split.json" in artifacts
    figures = [a for a in artifacts if a.startswith("figures/") and a.endswith(".png")]
    assert len(figures) == 2
    local = client.download_artifacts(run.info.run_id, figures[0])
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # artifacts live under the project folder, not under the working directory of the job
    assert str(project_dir) in client.get_experiment(run.info.experiment_id).artifact_location


def test_summary_printed(trained):
    result, _, runs, project_dir = trained
    out = result.stdout
    assert "test/dice_fg_mean" in out
    assert runs[0].info.run_id in out
    assert f"bioflow dashboard --project-dir {project_dir}" in out


def test_the_first_screen_holds_only_bioflows_lines(trained):
    """What the dependencies say about themselves (a cloud logger's advertisement, accelerators not
    found, their own deprecations, database set-up) stays off the screen; bioflow's lines stay."""
    result = trained[0]
    screen = result.stdout + result.stderr
    for noise in ("litlogger", "Tip:", "GPU available", "TPU available", "LeafSpec", "Creating initial MLflow database",
                  "not found. Creating it", "log_every_n_steps", "Trainable params", "Loading `train_dataloader`"):
        assert noise not in screen, noise
    assert "model: UNet" in screen and "epoch 1/2" in screen  # bioflow's own lines


def test_split_recorded_and_disjoint(trained):
    import json

    _, client, runs, _ = trained
    split = json.loads(Path(client.download_artifacts(runs[0].info.run_id, "split.json")).read_text())
    names = [set(split[s]) for s in ("train", "val", "test")]
    assert all(names)
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(map(len, names)) == 6


def test_evaluate_by_run_id_logs_into_the_same_run(trained):
    _, client, runs, project_dir = trained
    run_id = runs[0].info.run_id
    before = client.get_run(run_id).data.metrics["test/dice_fg_mean"]
    result = run_cli("evaluate", run_id, "--project-dir", str(project_dir))
    assert result.returncode == 0, result.stderr
    assert "test/dice_fg_mean" in result.stdout
    reported = float(result.stdout.split("test/dice_fg_mean = ")[1].split()[0])
    assert reported == pytest.approx(before, abs=1e-4)  # same checkpoint, same split, same metric
    flagged = float(result.stdout.split("test/fit_flagged_fraction = ")[1].split()[0])  # the fit check's view of it
    assert 0 <= flagged <= 1 and "test/fit_score_mean" in result.stdout
    assert "evaluation/test_metrics.json" in artifact_paths(client, run_id)
    assert len(client.search_runs([runs[0].info.experiment_id])) == 1


def test_evaluate_checkpoint_file_and_bad_inputs(trained, tmp_path):
    _, client, runs, project_dir = trained
    local = client.download_artifacts(runs[0].info.run_id, "checkpoints/best.ckpt", str(tmp_path))
    result = run_cli("evaluate", local, "--split", "val", "--no-log", "--project-dir", str(project_dir))
    assert result.returncode == 0, result.stderr
    assert "eval_val/dice_fg_mean" in result.stdout
    missing = run_cli("evaluate", "0" * 32, "--project-dir", str(project_dir))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "not found in" in missing.stderr and str(project_dir) in missing.stderr
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    bad = run_cli("evaluate", str(garbage), "--project-dir", str(project_dir))
    assert bad.returncode == 2 and "not a readable checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_store_on_localhost(trained):
    _, _, runs, project_dir = trained
    port = _free_port()
    proc = subprocess.Popen(
        [BIOFLOW, "dashboard", "--project-dir", str(project_dir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError("dashboard did not start")
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={runs[0].info.run_id}"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert runs[0].info.run_id in r.read().decode()
        # bound to loopback only
        assert _listening(port) and all(a.startswith("127.0.0.1:") for a in _listening(port))
        # SIGTERM to the bioflow process alone stops the whole server: nothing stays listening
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.time() + 15
        while _listening(port) and time.time() < deadline:
            time.sleep(0.5)
        assert not _listening(port)
        printed = proc.stdout.read().decode()
        assert "/#/experiments/" in printed and "workflowType=machine_learning" in printed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _listening(port: int) -> list[str]:
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in listening.splitlines() if line.strip()]


def test_experiment_opens_as_model_training_with_test_scores_as_columns(trained):
    import json

    _, client, runs, _ = trained
    experiment = client.get_experiment(runs[0].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.bioflow"])
    assert "metrics.`test/dice_fg_mean`" in view["selectedColumns"]
    assert runs[0].info.run_name.startswith("e2e-")


def test_dashboard_without_store_is_a_clear_error(tmp_path):
    result = run_cli("dashboard", "--project-dir", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "no MLflow store here" in result.stderr


@pytest.mark.parametrize("command", ["import bioflow", "from bioflow.cli import main; main(['plugins'])"])
def test_cold_start_imports_no_torch(command):
    code = command + "\nimport sys; print('@@', 'torch' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.rsplit("@@", 1)[1].split() == ["False", "False"]
    help_run = run_cli("--help")
    assert help_run.returncode == 0 and "plugins" in help_run.stdout


def test_export_by_run_id_finds_the_run_from_another_folder(trained, tmp_path):
    """export resolves a run id as predict and evaluate do: in the store it was trained into."""
    pytest.importorskip("bioimageio.core")
    _, _, runs, _ = trained
    result = run_cli("export", runs[0].info.run_id, "--out", str(tmp_path / "model.zip"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "model.zip").is_file() and "bioimage.io package" in result.stdout


def test_a_prediction_by_run_id_is_recorded_beside_its_training_run(trained, tmp_path):
    """Which model made this file: the prediction job is a run of 'predictions' in the model's store,
    linked to the training run both ways, and its OME-Zarr outputs name both runs."""
    pytest.importorskip("ome_zarr")
    import numpy as np
    import zarr

    from tests.helpers import write_ome_zarr

    _, client, runs, project_dir = trained
    model_run = runs[0].info.run_id
    image = np.random.default_rng(0).gamma(2.0, 200.0, (64, 64)).astype(np.uint16)
    write_ome_zarr(tmp_path / "a.ome.zarr", image, "yx", {"y": 1.0, "x": 1.0})
    result = run_cli("predict", model_run, str(tmp_path / "a.ome.zarr"), "--out", str(tmp_path / "out"),
                     "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Downloading artifacts" not in result.stderr + result.stdout  # no progress bar at all
    jobs = client.search_runs([client.get_experiment_by_name("predictions").experiment_id],
                              filter_string=f"tags.`bioflow.model_run_id` = '{model_run}'")
    assert len(jobs) == 1 and jobs[0].info.status == "FINISHED"
    assert model_run in jobs[0].data.tags["mlflow.note.content"]  # a link to the training run
    assert client.get_run(model_run).data.tags["bioflow.predictions"] == "1"
    made = zarr.open_group(str(tmp_path / "out" / "a.ome.zarr"), mode="r").attrs["bioflow"]
    assert made["model_run_id"] == model_run and made["prediction_run_id"] == jobs[0].info.run_id
    # the training experiment holds only the training run still
    assert len(client.search_runs([client.get_experiment_by_name("e2e").experiment_id])) == 1
