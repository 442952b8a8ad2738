"""Kill a training process with SIGKILL in the middle of an epoch, then resume it into the same run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import BIOFLOW, run_cli

JOB = [
    "data.source.n_images=8", "data.source.shape=[64,64]", "data.patch_size=[32,32]", "data.patches_per_epoch=96",
    "data.batch_size=4", "model.depth=1", "model.base_channels=4", "trainer.max_epochs=4",
    "trainer.enable_progress_bar=false", "test_after_training=false", "logger.experiment_name=resume",
]


def start(project: Path, cwd: Path, env: dict | None = None, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([BIOFLOW, "train", *JOB, *extra, f"project_dir={project}"], cwd=cwd,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill_during_epoch_two(proc: subprocess.Popen, project: Path) -> None:
    """SIGKILL once the first epoch's checkpoint exists and the second epoch is under way."""
    deadline = time.time() + 300
    while not list(project.glob("outputs/*/*/checkpoints/last.ckpt")):
        if time.time() > deadline or proc.poll() is not None:
            raise AssertionError(f"no checkpoint appeared: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.1)
    time.sleep(0.5)  # well inside epoch two (an epoch takes seconds)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def metrics_by_step(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    return {k: [m.step for m in client.get_metric_history(run_id, k)] for k in client.get_run(run_id).data.metrics}


def test_kill_and_resume_continues_the_same_run(tmp_path):
    project = tmp_path / "project"
    proc = start(project, tmp_path)
    kill_during_epoch_two(proc, project)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resume").experiment_id
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "RUNNING"
    epochs_before = len(client.get_metric_history(killed.info.run_id, "val/loss"))
    assert epochs_before < 4

    resumed = run_cli("train", "resume=last", *JOB[-3:], f"project_dir={project}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = client.search_runs([experiment])
    assert len(runs) == 1 and runs[0].info.run_id == killed.info.run_id
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["bioflow.resumed"] == "1"
    for key, steps in metrics_by_step(client, run.info.run_id).items():
        assert len(steps) == len(set(steps)), f"{key} has duplicated steps {steps}"
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 4  # all epochs, once each

    # an uninterrupted job of the same config ends at the same step with similar scores
    straight = run_cli("train", *JOB[:-1], "logger.experiment_name=straight", f"project_dir={project}", cwd=tmp_path)
    assert straight.returncode == 0
    (reference,) = client.search_runs([client.get_experiment_by_name("straight").experiment_id])
    last = lambda r, k: client.get_metric_history(r.info.run_id, k)[-1]  # noqa: E731
    assert last(run, "val/loss").step == last(reference, "val/loss").step
    assert last(run, "val/loss").value == pytest.approx(last(reference, "val/loss").value, abs=0.05)

    # a finished run: nothing asked is an error, other changes are refused, more epochs continue it
    where = [*JOB[-3:], f"project_dir={project}"]
    again = run_cli("train", "resume=last", *where, cwd=tmp_path)
    assert again.returncode == 2 and "finished its 4 epoch(s)" in again.stderr, again.stderr[-2000:]
    changed = run_cli("train", "resume=last", "model.depth=2", "trainer.max_epochs=5", *where, cwd=tmp_path)
    assert changed.returncode == 2 and "model.depth=2 would change" in changed.stderr
    longer = run_cli("train", "resume=last", "trainer.max_epochs=5", *where, cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 5
    assert len(client.search_runs([experiment])) == 1


def test_a_requeued_slurm_job_resumes_its_own_run(tmp_path):
    project = tmp_path / "project"
    proc = start(project, tmp_path, {"SLURM_JOB_ID": "4242"})
    kill_during_epoch_two(proc, project)
    requeued = run_cli("train", *JOB, f"project_dir={project}", cwd=tmp_path,
                       env={"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.data.tags["bioflow.slurm_job_id"] == "4242" and run.data.tags["bioflow.resumed"] == "1"
    assert run.info.status == "FINISHED"


def test_nothing_to_resume_is_a_clear_error(tmp_path):
    result = run_cli("train", "resume=last", "logger.experiment_name=nothing", f"project_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "no MLflow store" in result.stderr and "nothing to resume" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
