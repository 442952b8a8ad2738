"""The training-start comparison of object size and receptive field."""

from __future__ import annotations

import logging

from bioflow.data.module import BioflowDataModule
from bioflow.tasks import create_task, default_settings
from bioflow.tasks.segmentation import SegmentationTask
from bioflow.training import scale_check
from bioflow.testing import compose_config


def setup(depth: int, radius: str = "[6,12]"):
    config = compose_config(f"model.depth={depth}", "model.base_channels=2", "data.source.n_images=5",
                            "data.source.shape=[128,128]", f"data.source.radius={radius}")
    data = BioflowDataModule(config["data"], config["sampler"], 0, "mask",
                             SegmentationTask.target_transform(default_settings(SegmentationTask)))
    data.prepare()
    info = {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": data.split}
    return create_task(config, info), data


def test_warns_when_objects_exceed_the_receptive_field(caplog):
    task, data = setup(depth=1, radius="[14,20]")  # nuclei of about 34 px, receptive field 18 px
    with caplog.at_level(logging.WARNING):
        tags = scale_check(task, data)
    assert tags["bioflow.warning.objects_exceed_receptive_field"] == "true"
    assert "receptive field is 18 pixels" in caplog.text


def test_quiet_when_the_network_sees_whole_objects(caplog):
    task, data = setup(depth=3)
    with caplog.at_level(logging.WARNING):
        tags = scale_check(task, data)
    assert "bioflow.warning.objects_exceed_receptive_field" not in tags
    assert tags["bioflow.receptive_field_px"] == "100"
    assert float(tags["bioflow.object_size_median_px"]) < 100
    assert "receptive field" not in caplog.text
