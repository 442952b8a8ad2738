"""Jobs that share one project store (a facility's shared folder): started at once, all finish and
all are recorded with their metrics."""

from __future__ import annotations

import os
import subprocess

from mlflow.tracking import MlflowClient

from tests.helpers import BIOFLOW

TINY = ["experiment=demo_unet", "trainer.max_epochs=1", "data.source.n_images=6", "data.source.shape=[64,64]",
        "data.patch_size=[32,32]", "data.patches_per_epoch=8", "data.batch_size=4", "model.depth=1",
        "model.base_channels=4", "trainer.enable_progress_bar=false", "data.num_workers=0",
        "logger.experiment_name=shared"]


def test_four_trainings_started_at_once_into_a_new_project_are_all_recorded(tmp_path):
    project = tmp_path / "shared project"  # does not exist yet: all four race to create the store
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIOFLOW_STATE_DIR": str(tmp_path / "state")}
    jobs = [subprocess.Popen([BIOFLOW, "train", *TINY, f"seed={seed}", f"project_dir={project}"], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for seed in range(4)]
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output[-3000:]
        assert "Traceback" not in output and "database is locked" not in output
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2", "3"]
    for run in runs:  # what the dashboard shows: each run's own test scores
        assert "test/dice_fg_mean" in run.data.metrics and run.info.run_id in "".join(outputs)
