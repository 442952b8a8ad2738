"""Two-process DDP on CPU (gloo) through the real CLI: one run, synced metrics, sweeps, a tracking server."""

from __future__ import annotations

import json
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

from tests.helpers import run_cli

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
TINY = [
    "data.source.n_images=13", "data.source.shape=[64,64]", "data.patch_size=[32,32]", "data.patches_per_epoch=16",
    "data.batch_size=4", "model.depth=1", "model.base_channels=4", "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false", "test_after_training=false", "sampler=class_weighted",
]


def histories(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    keys = client.get_run(run_id).data.metrics
    return {k: [m.step for m in client.get_metric_history(run_id, k)] for k in keys}


def test_ddp_job_is_one_run_with_metrics_equal_to_a_single_process_evaluation(tmp_path):
    project = tmp_path / "project"
    result = run_cli("train", *DDP, *TINY, "logger.experiment_name=ddp", f"project_dir={project}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("bioflow: training finished") == 1  # the summary of rank 0 only
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    for key, steps in histories(client, run.info.run_id).items():
        assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {steps}"
    assert len(list((project / "outputs").glob("*/*"))) == 1  # one job folder for both ranks
    # the validation split has 3 images: 2 on rank 0 and 1 on rank 1, none counted twice
    best_epoch_values = {k: v for k, v in run.data.metrics.items() if k.startswith("val/")}
    ckpt = next((project / "outputs").glob("*/*/checkpoints/best-*.ckpt"))
    evaluated = run_cli("evaluate", str(ckpt), "--split", "val", "--no-log", "--project-dir", str(project))
    assert evaluated.returncode == 0, evaluated.stderr
    single = {line.split(" = ")[0].strip().replace("eval_val/", "val/"): float(line.split(" = ")[1])
              for line in evaluated.stdout.splitlines() if " = " in line}
    history = client.get_metric_history(run.info.run_id, "val/dice_fg_mean")
    best_step = max(history, key=lambda m: m.value).step
    for key in ("val/loss", "val/dice_fg_mean", "val/iou_foreground", "val/dice_background"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}[best_step]
        assert logged == pytest.approx(single[key], abs=1e-4), key
    assert set(best_epoch_values) <= {k for k in best_epoch_values}


def test_multirun_sweep_makes_one_run_and_one_folder_per_job(tmp_path):
    project = tmp_path / "project"
    result = run_cli("train", "-m", *DDP, *TINY, "trainer.max_epochs=1", "model.base_channels=2,4",
                     "logger.experiment_name=sweep", f"project_dir={project}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert sorted(r.data.params["model.base_channels"] for r in runs) == ["2", "4"]
    sweeps = list((project / "multirun").glob("*/*"))
    assert len(sweeps) == 1 and sorted(p.name for p in sweeps[0].iterdir() if p.is_dir()) == ["0", "1"]
    assert not (project / "outputs").exists() or not any((project / "outputs").iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tracking_server(tmp_path):
    """A lean MLflow server on 127.0.0.1 (one worker, no job execution), stopped by its PID."""
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                raise RuntimeError("the MLflow server did not start")
            time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def rest(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_two_process_job_against_a_tracking_server(tracking_server, tmp_path):
    result = run_cli("train", *DDP, *TINY, "trainer.max_epochs=1", "logger.experiment_name=team",
                     f"logger.tracking_uri={tracking_server}", f"project_dir={tmp_path / 'project'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = rest(tracking_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=team")["experiment"]
    runs = rest(tracking_server, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"train/loss", "val/dice_fg_mean"} <= metrics
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["trainer.devices"] == "2"
    files = rest(tracking_server, f"/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}&path=checkpoints")
    assert [f["path"] for f in files["files"]] == ["checkpoints/best.ckpt"]


def test_unreachable_server_fails_before_training(tmp_path):
    start = time.time()
    result = run_cli("train", *TINY, f"logger.tracking_uri=http://127.0.0.1:{_free_port()}",
                     f"project_dir={tmp_path / 'project'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("bioflow: error")]
    assert len(lines) == 1 and "unreachable" in lines[0]
    assert "Epoch" not in result.stdout + result.stderr and time.time() - start < 60


def test_ddp_stardist3d_is_one_run_with_metrics_equal_to_a_single_process_evaluation(tmp_path):
    project = tmp_path / "project"
    tiny = ["experiment=demo_stardist3d", "data.source.n_images=7", "data.source.shape=[16,40,40]",
            "data.patch_size=[16,32,32]", "data.patches_per_epoch=8", "data.batch_size=2", "model.depth=1",
            "model.base_channels=4", "task.n_rays=16", "task.stem_channels=4", "task.head_features=8",
            "task.optimize_thresholds=false", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
            "test_after_training=false", "data.split.val=0.3", "data.split.test=0.15"]
    result = run_cli("train", *DDP, *tiny, "logger.experiment_name=ddp3d", f"project_dir={project}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("bioflow: training finished") == 1
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddp3d").experiment_id])
    for key, steps in histories(client, run.info.run_id).items():
        assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {steps}"
    ckpt = next((project / "outputs").glob("*/*/checkpoints/best-*.ckpt"))
    evaluated = run_cli("evaluate", str(ckpt), "--split", "val", "--no-log", "--project-dir", str(project))
    assert evaluated.returncode == 0, evaluated.stderr
    single = {line.split(" = ")[0].strip().replace("eval_val/", "val/"): float(line.split(" = ")[1])
              for line in evaluated.stdout.splitlines() if " = " in line}
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}
    best_step = int(ckpt.stem.split("=")[1])  # best-epoch=NNN
    steps = sorted(history)
    # one value per epoch, each over both validation volumes (one on each rank)
    assert len(steps) == 2
    logged = history[steps[best_step]]
    assert logged == pytest.approx(single["val/loss"], abs=1e-4)
