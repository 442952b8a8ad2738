"""StarDist end to end through the CLI: train, thresholds chosen and stored, evaluate, predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from mlflow.tracking import MlflowClient

from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
from tests.helpers import run_cli

TINY = [
    "experiment=demo_stardist", "data.source.n_images=6", "data.source.shape=[64,64]", "data.patch_size=[32,32]",
    "data.patches_per_epoch=8", "data.batch_size=4", "model.depth=1", "model.base_channels=4", "task.features=8",
    "task.n_rays=16", "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "logger.experiment_name=sd_e2e",
]


@pytest.fixture(scope="module")
def stardist_run(project_dir: Path, tmp_path_factory):
    result = run_cli("train", *TINY, f"project_dir={project_dir}", cwd=tmp_path_factory.mktemp("sd"))
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{project_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sd_e2e").experiment_id])
    assert len(runs) == 1
    return client, runs[0], project_dir


def test_run_records_thresholds_metrics_over_iou_and_the_plot(stardist_run):
    client, run, _ = stardist_run
    assert 0.0 < float(run.data.params["stardist.prob_thresh"]) < 1.0
    assert float(run.data.params["stardist.nms_thresh"]) in (0.3, 0.4, 0.5)
    for tau in ("0.1", "0.5", "0.9"):
        assert f"test/accuracy_{tau}" in run.data.metrics and f"test/panoptic_quality_{tau}" in run.data.metrics
    assert "val/mean_accuracy" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")]
    assert "evaluation/test_matching_over_iou.png" in artifacts


def test_thresholds_travel_in_the_checkpoint(stardist_run, tmp_path):
    client, run, _ = stardist_run
    local = client.download_artifacts(run.info.run_id, "checkpoints/best.ckpt", str(tmp_path))
    state = torch.load(local, weights_only=True)["state_dict"]
    assert state["thresholds"][0].item() == pytest.approx(float(run.data.params["stardist.prob_thresh"]))


def test_evaluate_and_predict_by_run_id(stardist_run, tmp_path):
    client, run, project_dir = stardist_run
    result = run_cli("evaluate", run.info.run_id, "--project-dir", str(project_dir))
    assert result.returncode == 0, result.stderr
    assert "test/accuracy_0.5" in result.stdout
    image, _ = synthetic_nuclei_image((150, 130), seed=9, index=0)
    tifffile.imwrite(tmp_path / "nuclei.tif", image)
    predicted = run_cli("predict", run.info.run_id, str(tmp_path / "nuclei.tif"), "--out", str(tmp_path / "out"),
                        "--project-dir", str(project_dir), "--tile-size", "64", "--no-progress", "--tta")
    assert predicted.returncode == 0, predicted.stderr
    labels = tifffile.imread(tmp_path / "out" / "nuclei.tif")
    assert labels.shape == (150, 130) and labels.dtype == np.int32

