"""Training from a folder of TIFF files: lazy reading in worker processes, and bad data."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from mlflow.tracking import MlflowClient

from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
from tests.helpers import run_cli

TINY = [
    "data=tiff_folder", "data.patch_size=[32,32]", "data.patches_per_epoch=8", "data.batch_size=4",
    "data.num_workers=2", "model.depth=1", "model.base_channels=4", "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false", "logger.experiment_name=tiff", "test_after_training=false",
]


@pytest.fixture
def folders(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(5):
        image, labels = synthetic_nuclei_image((64, 48), seed=3, index=i)
        tifffile.imwrite(images / f"img{i}.ome.tif", image, ome=True,
                         metadata={"axes": "YX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3})
        tifffile.imwrite(masks / f"img{i}.tif", labels, compression="zlib")  # read through zarr
    return images, masks


def test_trains_from_tiff_folders_with_worker_processes(folders, tmp_path):
    images, masks = folders
    result = run_cli("train", *TINY, f"data.source.images={images}", f"data.source.masks={masks}",
                     f"project_dir={tmp_path / 'proj'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'proj' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tiff").experiment_id])[0]
    assert run.data.params["data.source.images"] == str(images)
    assert "val/dice_foreground" in run.data.metrics  # own data: no class names given


def test_bad_data_stops_before_the_run_with_one_line(folders, tmp_path):
    images, masks = folders
    tifffile.imwrite(masks / "img2.tif", np.ones((64, 40), np.uint16))
    result = run_cli("train", *TINY, f"data.source.images={images}", f"data.source.masks={masks}",
                     f"project_dir={tmp_path / 'proj'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("bioflow: error")]
    assert len(lines) == 1 and "img2" in lines[0] and "(64, 40)" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "proj" / "mlflow.db").exists()


def test_min_foreground_keeps_only_patches_with_objects():
    from bioflow.data.module import BioflowDataModule
    from bioflow.tasks import default_settings
    from bioflow.tasks.segmentation import SegmentationTask
    from bioflow.testing import compose_config

    config = compose_config("data.source.n_images=5", "data.source.shape=[96,96]", "data.patch_size=[32,32]",
                            "data.min_foreground=0.3")
    data = BioflowDataModule(config["data"], config["sampler"], 0, "mask",
                             SegmentationTask.target_transform(default_settings(SegmentationTask)))
    data.prepare()
    loader = data.train_dataloader()
    index = loader.dataset.index
    assert (index.foreground_fractions() >= 0.3).all()
    assert len(index) < len(type(index)(index.records, index.patch_size))
