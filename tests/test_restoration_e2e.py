"""CARE and Noise2Void through the CLI: train, quality metrics in the run, restored images, caveats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli

TINY = ["data.source.n_images=5", "data.source.shape=[64,64]", "data.patch_size=[32,32]", "data.patches_per_epoch=8",
        "data.batch_size=4", "model.depth=1", "model.base_channels=4", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize(("experiment", "caveat"), [("demo_care", "CARE reproduces"), ("demo_n2v", "independent from pixel")])
def test_train_then_predict_a_restored_image(experiment, caveat, project_dir: Path, tmp_path):
    name = f"e2e_{experiment}"
    result = run_cli("train", f"experiment={experiment}", *TINY, f"logger.experiment_name={name}",
                     f"project_dir={project_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{project_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name(name).experiment_id])[0]
    for key in ("train/loss", "val/loss", "val/psnr", "val/ssim", "test/psnr"):
        assert key in run.data.metrics, key
    noisy = (np.random.default_rng(0).random((48, 40)) * 255).astype(np.float32)
    tifffile.imwrite(tmp_path / "noisy.tif", noisy, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1})
    predicted = run_cli("predict", run.info.run_id, str(tmp_path / "noisy.tif"), "--out", str(tmp_path / "out"),
                        "--project-dir", str(project_dir), "--no-progress")
    assert predicted.returncode == 0, predicted.stderr
    assert f"bioflow: note: {caveat}".split(":")[0] in predicted.stderr and caveat in predicted.stderr
    with tifffile.TiffFile(tmp_path / "out" / "noisy.tif") as tif:
        restored = tif.asarray()
        assert tif.series[0].axes == "YX" and 'PhysicalSizeX="0.1"' in tif.ome_metadata
    assert restored.shape == noisy.shape and restored.dtype == np.float32
    assert 0.1 * noisy.mean() < restored.mean() < 10 * noisy.mean()  # back in the image's intensity units
    report = (tmp_path / "out" / "fit_report.csv").read_text().splitlines()  # the input against the training data
    assert report[0] == "file,score,threshold,fits,reason,intensity,noise,content" and len(report) == 2
    assert report[1].startswith(str(tmp_path / "noisy.tif"))
    import bioflow

    verdict = bioflow.load_model(run.info.run_id, project_dir=str(project_dir)).predict(noisy)["fit"]
    score, threshold, fits = report[1].split(",")[1:4]
    assert verdict["score"] == pytest.approx(float(score), rel=1e-3) and str(verdict["fits"]) == fits


@pytest.mark.parametrize("experiment", ["demo_care", "demo_n2v"])
def test_a_probabilistic_model_writes_its_uncertainty_beside_the_restored_image(experiment, project_dir: Path, tmp_path):
    """task.probabilistic=true: calibration in the run (validation before/after, test after), a
    calibration plot, an uncertainty image with the restored one's axes and pixel size, and both
    from Python."""
    import bioflow

    name = f"prob_{experiment}"
    result = run_cli("train", f"experiment={experiment}", *TINY, "task.probabilistic=true", "data.source.n_images=6",
                     f"logger.experiment_name={name}", f"project_dir={project_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{project_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name(name).experiment_id])[0]
    for key in ("test/calibration_mean_abs_log_ratio",
                "test/calibration_worst_ratio_error", "test/uncertainty_top5_error_ratio"):
        assert key in run.data.metrics, sorted(run.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")]
    assert any(p.endswith("calibration.png") for p in artifacts), artifacts
    noisy = (np.random.default_rng(0).random((48, 40)) * 255).astype(np.float32)
    tifffile.imwrite(tmp_path / "noisy.tif", noisy, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1})
    predicted = run_cli("predict", run.info.run_id, str(tmp_path / "noisy.tif"), "--out", str(tmp_path / "out"),
                        "--project-dir", str(project_dir), "--no-progress")
    assert predicted.returncode == 0, predicted.stderr
    with tifffile.TiffFile(tmp_path / "out" / "noisy_uncertainty.tif") as tif:
        std = tif.asarray()
        assert tif.series[0].axes == "YX" and 'PhysicalSizeX="0.1"' in tif.ome_metadata
    restored = tifffile.imread(tmp_path / "out" / "noisy.tif")
    assert std.shape == restored.shape == noisy.shape and std.dtype == np.float32
    assert np.all(std > 0) and std.mean() < noisy.max() - noisy.min()  # a std in the image's units
    model = bioflow.load_model(run.info.run_id, project_dir=str(project_dir))
    outputs = model.predict(noisy)
    assert outputs["uncertainty"].shape == outputs["restored"].shape == (1, *noisy.shape)  # (C, Y, X) both
    np.testing.assert_allclose(outputs["uncertainty"][0], std, rtol=1e-4, atol=1e-4 * float(std.max()))
    np.testing.assert_allclose(outputs["restored"][0], restored, rtol=1e-4, atol=1e-3)
    if experiment == "demo_n2v":  # the signal's std: the observation's less the noise model's
        assert "signal_uncertainty" in model.outputs and "test/signal_calibration_mean_abs_log_ratio" in run.data.metrics
        assert float(run.data.params["noise_model_b"]) >= 0 and float(run.data.params["noise_model_a"]) >= 0
        share = float(run.data.params["signal_variance_share"])  # and a warning when too little is left to read
        assert 0 <= share <= 1 and ("nearly equal variances" in result.stderr) == (share < 0.25), (share, result.stderr[-2000:])
        signal = tifffile.imread(tmp_path / "out" / "noisy_signal_uncertainty.tif")
        assert signal.shape == noisy.shape and np.all(signal >= 0) and np.all(signal <= std * (1 + 1e-5) + 1e-4)
        np.testing.assert_allclose(outputs["signal_uncertainty"][0], signal, rtol=1e-4, atol=1e-4 * float(std.max()))
    else:
        assert "signal_uncertainty" not in model.outputs
    exported = run_cli("export", run.info.run_id, "--out", str(tmp_path / "m.zip"), "--project-dir", str(project_dir))
    assert exported.returncode == 0 and (tmp_path / "m.zip").exists(), exported.stderr[-2000:]  # with its std
