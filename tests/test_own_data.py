"""Your own data, for every method: the documented one-line commands on TIFF files written here.

Each method trains from files with ``experiment=<method>_own_data`` (plus tiny sizes) and its
model predicts the files with ``bioflow predict <run id>``, found without naming the project
folder. Noise2Void trains on one time-lapse file alone (validation from a held-out region) and
denoises it frame by frame, keeping its axes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
from tests.helpers import run_cli

TINY = ["trainer.max_epochs=1", "data.patches_per_epoch=8", "data.batch_size=4", "data.num_workers=0",
        "trainer.enable_progress_bar=false"]
SMALL_NET = ["model.depth=1", "model.base_channels=4"]


def write_nuclei(folder: Path, n: int, masks: bool = True) -> None:
    (folder / "images").mkdir(parents=True)
    if masks:
        (folder / "masks").mkdir()
    for i in range(n):
        image, labels = synthetic_nuclei_image((64, 64), seed=11, index=i)
        tifffile.imwrite(folder / "images" / f"field{i}.tif", (image * 1000).astype(np.uint16))
        if masks:
            tifffile.imwrite(folder / "masks" / f"field{i}.tif", labels.astype(np.uint16))


def run_id_of(result) -> str:
    line = next(ln for ln in result.stdout.splitlines() if ln.strip().startswith("MLflow run:"))
    return line.split()[2]


def train_and_predict(tmp_path: Path, overrides: list[str], inputs: Path, state: Path) -> Path:
    env = {"BIOFLOW_STATE_DIR": str(state)}
    trained = run_cli("train", *overrides, *TINY, f"project_dir={tmp_path / 'project'}", cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "predict:" in trained.stdout
    out = tmp_path / "predicted"
    # from another folder and without --project-dir: the run is found where it was trained
    predicted = run_cli("predict", run_id_of(trained), str(inputs), "--out", str(out), "--no-progress",
                        cwd=tmp_path / "images" if (tmp_path / "images").is_dir() else tmp_path, env=env)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    return out


@pytest.mark.parametrize("experiment", ["unet_own_data", "stardist_own_data"])
def test_segmentation_methods_on_a_tiff_folder_with_a_fixed_test_image(experiment, tmp_path):
    write_nuclei(tmp_path, 5)
    images = tmp_path / "images"
    net = SMALL_NET if experiment == "unet_own_data" else ["model.depth=1", "model.base_channels=8", "task.head_features=8"]
    overrides = [f"experiment={experiment}", f"data.source.images={images}", f"data.source.masks={tmp_path / 'masks'}",
                 f"data.split.test=[{images / 'field4.tif'}]", "data.split.val=[field3]", "data.patch_size=[32,32]", *net]
    out = train_and_predict(tmp_path, overrides, images, tmp_path / "state")
    labels = tifffile.imread(out / "field0.tif")
    assert labels.shape == (64, 64) and np.issubdtype(labels.dtype, np.integer)


def test_care_on_image_pairs(tmp_path):
    rng = np.random.default_rng(0)
    for kind in ("low", "high"):
        (tmp_path / kind).mkdir()
    for i in range(4):
        clean, _ = synthetic_nuclei_image((64, 64), seed=12, index=i)
        tifffile.imwrite(tmp_path / "high" / f"s{i}.tif", clean.astype(np.float32))
        tifffile.imwrite(tmp_path / "low" / f"s{i}.tif", (clean + rng.normal(0, 0.2, clean.shape)).astype(np.float32))
    overrides = ["experiment=care_own_data", f"data.source.images={tmp_path / 'low'}",
                 f"data.source.targets={tmp_path / 'high'}", "data.patch_size=[32,32]", *SMALL_NET]
    out = train_and_predict(tmp_path, overrides, tmp_path / "low" / "s0.tif", tmp_path / "state")
    restored = tifffile.imread(out / "s0.tif")
    assert restored.shape == (64, 64) and restored.dtype == np.float32


def test_n2v_on_one_time_lapse_denoises_every_frame_with_its_axes(tmp_path):
    rng = np.random.default_rng(1)
    frames = np.stack([synthetic_nuclei_image((64, 80), seed=13, index=t)[0] for t in range(5)])
    noisy = (1000 * frames + rng.normal(0, 100, frames.shape)).astype(np.float32)
    movie = tmp_path / "movie.ome.tif"
    tifffile.imwrite(movie, noisy, ome=True, metadata={"axes": "TYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2})
    overrides = ["experiment=n2v_own_data", f"data.source.images={movie}", "data.patch_size=[32,32]", *SMALL_NET]
    out = train_and_predict(tmp_path, overrides, movie, tmp_path / "state")
    with tifffile.TiffFile(out / "movie.tif") as tif:
        assert tif.series[0].axes == "TYX"
        restored = tif.asarray()
    assert restored.shape == noisy.shape and restored.dtype == np.float32
    assert not np.allclose(restored[0], restored[1])  # each frame its own prediction


def test_n2v_refuses_masks_and_an_unfitting_loss(tmp_path):
    write_nuclei(tmp_path, 3)
    images, masks = tmp_path / "images", tmp_path / "masks"
    with_masks = run_cli("train", "experiment=n2v_own_data", f"data.source.images={images}",
                         f"data.source.masks={masks}", f"project_dir={tmp_path / 'p'}", cwd=tmp_path)
    assert with_masks.returncode == 2 and "takes no masks" in with_masks.stderr and "data.source.masks" in with_masks.stderr
    wrong_loss = run_cli("train", "experiment=n2v_own_data", f"data.source.images={images}", "loss=ce_dice",
                         f"project_dir={tmp_path / 'p'}", cwd=tmp_path)
    assert wrong_loss.returncode == 2 and "loss=ce_dice" in wrong_loss.stderr and "masked_mse" in wrong_loss.stderr
    assert not (tmp_path / "p" / "mlflow.db").exists()
