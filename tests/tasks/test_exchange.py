"""The exchange hooks of the task template: generic defaults, and the state a package restores."""

from __future__ import annotations

import pytest
import torch

from bioflow.tasks import create_task
from bioflow.tasks.exchange import TASK_STATE
from bioflow.testing import compose_config

INFO = {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": {}}
SMALL = ("model.depth=1", "model.base_channels=4")


def stardist(thresholds=(0.5, 0.4)):
    config = compose_config("task=stardist", *SMALL, "task.n_rays=8", "task.stem_channels=4", "task.features=4",
                            "task.head_features=8", f"task.prob_thresh={thresholds[0]}", f"task.nms_thresh={thresholds[1]}")
    return create_task(config, INFO)


def test_the_task_state_round_trips_through_a_package_config():
    exported = stardist((0.7, 0.3))
    config = {"bioflow": {TASK_STATE: exported.task_state()}, **exported.package_config()}
    assert exported.task_state() == {"thresholds": pytest.approx([0.7, 0.3])}
    rebuilt = stardist()
    rebuilt.load_package_config(config)
    assert torch.allclose(rebuilt.thresholds, torch.tensor([0.7, 0.3]))


def test_packages_written_before_the_task_state_take_stardists_own_thresholds():
    rebuilt = stardist()
    rebuilt.load_package_config({"bioflow": {}, "stardist": {"thresholds": {"prob": 0.62, "nms": 0.5}}})
    assert torch.allclose(rebuilt.thresholds, torch.tensor([0.62, 0.5]))


def test_a_task_without_hooks_exports_its_raw_output():
    from bioflow.tasks.base import BaseTask

    class PlainTask(BaseTask):  # what a plugin task gets without writing any exchange hook
        def out_channels(self) -> int:
            return 3

    assert PlainTask.title() == "Plain" and PlainTask.citations == () and PlainTask.caveat == ""
    config = compose_config("task=segmentation", *SMALL)
    task = PlainTask(config, INFO, inference=True, monitor="val/loss", monitor_mode="min")
    (output,) = task.package_outputs()
    assert output.id == "output" and len(output.channel_names) == 3 and output.postprocessing == []
    assert task.package_config() == {} and task.prediction_caveats() == []


def test_the_caveat_is_one_text_for_prediction_and_the_readme():
    task = stardist()
    assert task.prediction_caveats() == [task.caveat] and "star-convex" in task.caveat
