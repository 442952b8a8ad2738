"""Multi-class U-Net: the classes and their names follow from the masks unless given, and masks
that do not fit the given classes stop training with one line before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from bioflow.data.records import ImageRecord
from bioflow.errors import BioflowError, ConfigError, DataError
from bioflow.tasks.segmentation import SegmentationTask, class_settings, default_class_names, mask_classes
from tests.helpers import run_cli


def record(mask, name="a") -> ImageRecord:
    mask = np.asarray(mask)
    return ImageRecord(name=name, image=np.zeros((1, *mask.shape), np.float32), target=mask, source=f"{name}.tif",
                       meta={"target_source": f"masks/{name}.tif"})


def test_classes_are_counted_from_the_largest_mask_value_of_every_split():
    assert mask_classes([record([[0, 1], [1, 0]], "a"), record([[0, 3], [0, 0]], "b")]) == (4, "masks/b.tif")
    found = SegmentationTask.settings_from_data({"target": "classes", "num_classes": None, "class_names": None},
                                                [record([[0, 2]])])
    assert found == {"num_classes": 3, "class_names": ["background", "class1", "class2"]}


def test_binary_targets_have_two_classes_named_background_and_foreground():
    found = SegmentationTask.settings_from_data({"target": "binary", "num_classes": None, "class_names": None},
                                                [record([[0, 7], [9, 0]])])
    assert found == {"num_classes": 2, "class_names": ["background", "foreground"]}
    assert SegmentationTask.settings_from_data({"target": "binary", "num_classes": 2, "class_names": ["bg", "cell"]},
                                               [record([[0, 7]])]) == {}


@pytest.mark.parametrize(("mask", "named"), [
    ([[0, 255]], "task.target=binary"),      # a 0/255 mask read as class indices
    ([[0, 900]], "900"),                     # instance labels
    ([[0, -1]], "masks/a.tif"),
])
def test_masks_that_are_no_class_indices_are_one_line(mask, named):
    with pytest.raises(DataError, match=named.replace(".", r"\.")):
        SegmentationTask.settings_from_data({"target": "classes", "num_classes": None, "class_names": None},
                                            [record(mask)])


def test_many_classes_are_taken_when_given():
    assert SegmentationTask.settings_from_data({"target": "classes", "num_classes": 40, "class_names": None},
                                               [record([[0, 39]])])["class_names"][-1] == "class39"


def test_a_mask_value_beyond_the_given_classes_names_the_mask_and_the_count_needed():
    with pytest.raises(DataError) as caught:
        SegmentationTask.settings_from_data({"target": "classes", "num_classes": 2, "class_names": None},
                                            [record([[0, 1]], "a"), record([[2, 0]], "b")])
    assert "masks/b.tif" in str(caught.value) and "task.num_classes=3" in str(caught.value)


def test_class_names_default_from_the_number_of_classes_and_must_match_it():
    assert class_settings("classes", 4, None) == (4, default_class_names(4))
    assert default_class_names(4) == ["background", "class1", "class2", "class3"]
    with pytest.raises(ConfigError, match="task.class_names: 2 names for 3 classes"):
        class_settings("classes", 3, ["a", "b"])
    with pytest.raises(ConfigError, match="task.num_classes"):
        class_settings("binary", 3, None)
    with pytest.raises(ConfigError, match="task.num_classes"):
        class_settings("classes", 1, None)
    with pytest.raises(ConfigError, match="x named twice"):
        class_settings("classes", 4, ["bg", "x", "x", "y"])


def test_the_settings_own_errors_come_before_the_masks():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        SegmentationTask.settings_from_data({"target": "classes", "num_classes": 0, "class_names": None},
                                            [record([[0, 2]])])


def test_the_summary_shows_every_class_score_and_only_headline_thresholds():
    import io

    from bioflow.training.job import print_summary

    classes = {f"test/{m}_{c}": 0.5 for m in ("dice", "iou") for c in ("background", "a", "b", "c", "d")}
    thresholds = {f"test/{m}_{t / 10:g}": 0.5 for m in ("accuracy", "precision") for t in range(1, 10)}
    for test, shown, hidden in ((classes, "test/dice_d", None), (thresholds, "test/accuracy_0.5", "test/accuracy_0.3")):
        out = io.StringIO()
        print_summary({"test": {**test, "test/loss": 1.0, "test/dice_mean": 0.5}, "best_score": None, "run_id": "r",
                       "experiment": "e", "tracking_uri": "u", "best_checkpoint": "c", "output_dir": "o",
                       "dashboard": "d", "dashboard_page": "p", "predict": "x"}, out=out)
        assert shown in out.getvalue() and "test/loss" in out.getvalue()
        assert hidden is None or hidden not in out.getvalue()


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    """Images of two kinds of blobs (dim: class 1, bright: class 2) and masks 0/1/2."""
    root = tmp_path_factory.mktemp("classes")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for i in range(6):
        image, mask = rng.normal(0.1, 0.03, (64, 64)).astype(np.float32), np.zeros((64, 64), np.uint8)
        for j in range(6):
            cy, cx = rng.integers(8, 56, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(16, 40)
            mask[disc] = 1 + j % 2
            image[disc] += 0.4 if j % 2 == 0 else 1.0
        tifffile.imwrite(root / "images" / f"im{i}.tif", image)
        tifffile.imwrite(root / "masks" / f"im{i}.tif", mask)
    return root


TINY = ["experiment=unet_own_data", "task.target=classes", "trainer.max_epochs=1", "data.patch_size=[32,32]",
        "data.patches_per_epoch=8", "data.batch_size=4", "model.depth=1", "model.base_channels=4",
        "data.num_workers=0", "trainer.enable_progress_bar=false", "logger.experiment_name=classes"]


def test_a_three_class_unet_trains_from_masks_with_no_class_settings(three_classes, tmp_path):
    from mlflow.tracking import MlflowClient

    result = run_cli("train", *TINY, f"data.source.images={three_classes / 'images'}",
                     f"data.source.masks={three_classes / 'masks'}", f"project_dir={tmp_path / 'p'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'p' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("classes").experiment_id])
    assert run.data.params["task.num_classes"] == "3"   # counted, and recorded with the run
    for name in ("background", "class1", "class2"):
        assert f"test/dice_{name}" in run.data.metrics, sorted(run.data.metrics)
    assert "test/dice_class1" in result.stdout  # the per-class test Dice is reported


def test_the_python_api_raises_the_clis_one_line(three_classes, tmp_path, monkeypatch):
    import bioflow

    monkeypatch.chdir(tmp_path)
    overrides = [*TINY, f"data.source.images={three_classes / 'images'}", f"data.source.masks={three_classes / 'masks'}",
                 f"project_dir={tmp_path / 'p'}"]
    for extra, named in ((["task.num_classes=2"], "task.num_classes=3"), (["task.class_names=[a,b]"], "task.class_names")):
        with pytest.raises(BioflowError, match=named.replace(".", r"\.")) as caught:
            bioflow.train(overrides + extra)
        cli = run_cli("train", *overrides, *extra, cwd=tmp_path)
        assert f"bioflow: error: {caught.value}" in cli.stderr
    assert not (tmp_path / "p").exists()  # neither a store nor an empty job folder, from Python as from the CLI
