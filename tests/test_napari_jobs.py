"""The napari plugin's work without Qt: layer axes, results as layers, layers as training data, the
model list, and predicting and training with progress, stop and cancel. (The widgets themselves:
tests/test_napari_widgets.py, under a display.)"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from bioflow.errors import BioflowError, DataError
from bioflow.napari.jobs import Cancelled, PredictionJob, TrainingJob, thresholds_of
from bioflow.napari.layers import TrainingData, guess_axes, result_layers, write_training_data
from bioflow.napari.models import experiments_for, list_runs, task_names
from bioflow.testing import make_checkpoint

TINY = ["trainer.max_epochs=3", "data.patches_per_epoch=8", "data.batch_size=4", "data.patch_size=[64,64]",
        "model.base_channels=8", "data.num_workers=0", "logger.experiment_name=napari"]


@pytest.mark.parametrize("shape, dims, channels, rgb, axes", [
    ((64, 64), 2, 1, False, "YX"),
    ((3, 64, 64), 2, 3, False, "CYX"),
    ((5, 64, 64), 2, 1, False, "TYX"),      # a stack for a 2D model: plane by plane
    ((5, 2, 64, 64), 2, 2, False, "TCYX"),
    ((64, 64, 3), 2, 3, True, "YXC"),
    ((16, 64, 64), 3, 1, False, "ZYX"),
])
def test_layer_axes_for_a_model(shape, dims, channels, rgb, axes):
    assert guess_axes(shape, dims, channels, rgb=rgb) == axes


@pytest.mark.parametrize("shape, dims, channels, words", [
    ((64, 64), 3, 1, "3D model"),
    ((4, 64, 64), 2, 2, "first axis should be the 2 channels"),
    ((2, 3, 4, 64, 64), 2, 1, "it takes YX"),
    ((64, 64), 2, 3, "one channel of shape"),
])
def test_layers_unfit_for_a_model_are_one_line(shape, dims, channels, words):
    with pytest.raises(DataError, match=words) as info:
        guess_axes(shape, dims, channels, name="cells")
    assert str(info.value).startswith("cells:") and "\n" not in str(info.value)


class Spec:
    def __init__(self, name, table=False):
        self.name, self.table = name, table


class FakeModel:
    run_id = "abc"
    checkpoint = None

    def __init__(self, *names, tables=()):
        specs = [Spec(n) for n in names] + [Spec(t, True) for t in tables]
        self.task = type("T", (), {"prediction_outputs": lambda self: specs})()


def test_results_become_layers_on_the_source_grid():
    objects = np.zeros(2, dtype=[("label", np.int32), ("probability", np.float32), ("area", np.int64)])
    objects["label"], objects["probability"] = [1, 2], [0.9, 0.6]
    labels = np.zeros((8, 8), np.int32)
    labels[:2, :2], labels[5:, 5:] = 1, 2
    layers = result_layers({"labels": labels, "objects": objects, "fit": {"fits": True}}, "cells", "CYX",
                           FakeModel("labels", tables=["objects"]), scale=[1, 0.5, 0.25], translate=[0, 10, 20])
    assert len(layers) == 1
    data, meta, kind = layers[0]
    assert kind == "labels" and data is labels and meta["name"] == "cells labels (abc)"
    assert meta["scale"] == [0.5, 0.25] and meta["translate"] == [10, 20]  # the channel axis dropped
    assert list(meta["features"]["index"]) == [1, 2] and np.allclose(meta["features"]["probability"], [0.9, 0.6])

    restored = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)  # T, C, Y, X
    spread = np.random.default_rng(1).random((3, 2, 8, 8)).astype(np.float32)
    layers = result_layers({"restored": restored, "tta_spread": spread}, "movie", "TYX", FakeModel("restored", "tta_spread"),
                           scale=[2, 1, 1])
    (r, rmeta, rkind), (s, smeta, skind) = layers
    assert rkind == skind == "image" and r.shape == (3, 8, 8) and np.array_equal(r, restored[:, 0])
    assert rmeta["scale"] == [2, 1, 1]
    assert s.shape == (3, 2, 8, 8) and smeta["channel_axis"] == 1 and smeta["colormap"] == "magma"


@pytest.mark.parametrize("shape, dims, rgb, axes", [
    ((64, 64), (2,), False, "YX"),
    ((5, 64, 64), (2,), False, "TYX"),     # StarDist 2D: a stack is frames
    ((16, 64, 64), (3,), False, "ZYX"),    # StarDist 3D: a volume
    ((16, 64, 64), (2, 3), False, "ZYX"),  # a task for both: napari's 3D layers are volumes
    ((64, 64, 3), (2, 3), True, "YXC"),
])
def test_training_axes_of_a_layer(shape, dims, rgb, axes):
    from bioflow.napari.layers import training_axes

    assert training_axes(shape, dims, rgb=rgb) == axes


def test_training_axes_that_cannot_be_guessed_are_asked_for():
    from bioflow.napari.layers import training_axes

    with pytest.raises(DataError, match="give its axes"):
        training_axes((2, 3, 64, 64), (2, 3), name="cells")
    with pytest.raises(DataError, match="for a task of 3D data"):
        training_axes((64, 64), (3,), name="cells")


def test_a_layers_pixel_size_comes_from_its_units():
    from bioflow.napari.layers import layer_pixel_size

    napari = pytest.importorskip("napari")
    layer = napari.layers.Image(np.zeros((4, 8, 8)), scale=(2.0, 0.5, 0.5), units=("um", "nm", "nm"))
    assert layer_pixel_size(layer, "ZYX") == pytest.approx([2.0, 0.0005, 0.0005])
    assert layer_pixel_size(napari.layers.Image(np.zeros((4, 8, 8)), scale=(2, 1, 1)), "ZYX") is None  # pixels: unknown
    assert layer_pixel_size(layer, "TYX") == pytest.approx([0.0005, 0.0005])


def test_layers_are_written_as_a_training_set(tmp_path):
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    labels = np.zeros((64, 64), np.int32)
    labels[10:20, 10:20] = 1
    folder, overrides = write_training_data(TrainingData({"my cells/1": image}, {"my cells/1": labels}), "mask", tmp_path)
    assert folder.parent == tmp_path / "napari-data"
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.tif"))
    assert written == ["images/my_cells_1.tif", "masks/my_cells_1.tif"]
    assert np.array_equal(tifffile.imread(folder / "masks" / "my_cells_1.tif"), labels)
    assert f"data.source.masks={folder / 'masks'}" in overrides and "data=tiff_folder" in overrides
    _, n2v = write_training_data(TrainingData({"noisy": image}), "optional_image", tmp_path)
    assert "data=tiff_images" in n2v and not any("masks" in o or "targets" in o for o in n2v)
    _, care = write_training_data(TrainingData({"low": image}, {"low": image * 2}), "image", tmp_path)
    assert "data=tiff_pairs" in care
    rgb = np.zeros((64, 64, 3), np.uint8)
    _, with_axes = write_training_data(TrainingData({"rgb": rgb}, {"rgb": labels}, axes="YXC", pixel_size=[0.5, 0.5]),
                                       "mask", tmp_path)  # a mask without the colour axis fits an RGB image
    assert {"data.source.axes=YXC", "data.source.mask_axes=YX", "data.source.pixel_size=[0.5,0.5]"} <= set(with_axes)


@pytest.mark.parametrize("targets, kind, words", [
    ({}, "mask", "has no labels layer"),
    ({"a": np.zeros((32, 32), np.int32)}, "mask", "does not match"),
    ({"a": np.zeros((64, 64), np.int32)}, "mask", "no labelled object"),
    ({"a": np.zeros((60, 64), np.float32)}, "image", "target image layer of shape"),
])
def test_unfit_layers_are_refused_before_anything_is_written(tmp_path, targets, kind, words):
    image = np.ones((64, 64), np.float32)
    with pytest.raises(DataError, match=words):
        write_training_data(TrainingData({"a": image}, targets), kind, tmp_path)
    assert not (tmp_path / "napari-data").exists()


def test_tasks_and_experiments_come_from_the_registry():
    tasks = task_names()
    assert {"segmentation", "stardist", "stardist3d", "care", "n2v"} <= set(tasks)
    assert "stardist_own_data" in experiments_for("stardist") and "demo_stardist3d" in experiments_for("stardist3d")
    assert "demo_stardist" not in experiments_for("care")
    try:
        import bioflow_example_plugin  # noqa: F401
    except ImportError:
        return
    assert "field_classifier" in tasks  # a plugin's task is offered like a built-in
    assert "example_plugin_demo" in experiments_for("segmentation")


def test_a_prediction_reports_progress_and_can_be_cancelled(tmp_path):
    import bioflow

    path = make_checkpoint(tmp_path / "m.ckpt", "experiment=demo_stardist", "model.base_channels=8")
    model = bioflow.load_model(str(path))
    own = thresholds_of(model.task)
    image = np.random.default_rng(0).random((96, 96)).astype(np.float32)
    seen = []
    result = PredictionJob(model, image, "YX", {"tile_size": 48}, thresholds=(0.3, 0.2)).run(lambda d, t: seen.append((d, t)))
    assert seen[-1][0] == seen[-1][1] > 1 and "labels" in result
    assert thresholds_of(model.task) == own  # the model's own thresholds are back

    job = PredictionJob(model, image, "YX", {"tile_size": 48})
    job.cancel()
    with pytest.raises(Cancelled):
        job.run()


@pytest.fixture(scope="module")
def layer_data(tmp_path_factory):
    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image

    image, labels = synthetic_nuclei_image((128, 128), seed=0, index=0)
    return image, labels


def test_training_stopped_early_keeps_its_best_model_and_is_listed(tmp_path, layer_data):
    folder, data = write_training_data(TrainingData({"nuclei": layer_data[0]}, {"nuclei": layer_data[1]}), "mask", tmp_path)
    events = []

    def on_event(kind, step, value):
        events.append(kind)
        if kind == "validation":
            job.stop()

    job = TrainingJob(["experiment=stardist_own_data", *data, *TINY], tmp_path, discard=[folder], on_event=on_event)
    summary = job.run()
    assert events.count("validation") == 1 and "loss" in events  # stopped after the first epoch of 3
    assert summary["best_checkpoint"] and summary["test"]
    runs = list_runs(tmp_path)
    assert [r.run_id for r in runs] == [summary["run_id"]] and runs[0].experiment == "napari"
    assert runs[0].task == "stardist" and runs[0].score_name == "test/accuracy_0.5"
    assert folder.is_dir()  # the data the run was trained on stays with it


def test_cancelled_training_leaves_no_run_and_no_files(tmp_path, layer_data):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    folder, data = write_training_data(TrainingData({"nuclei": layer_data[0]}, {"nuclei": layer_data[1]}), "mask", tmp_path)

    def on_event(kind, step, value):
        job.cancel()

    job = TrainingJob(["experiment=stardist_own_data", *data, *TINY], tmp_path, discard=[folder], on_event=on_event)
    with pytest.raises(Cancelled):
        job.run()
    assert job.run_id is not None and list_runs(tmp_path) == []
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments, run_view_type=ViewType.ALL) == []  # gone, not merely failed or marked deleted
    assert not folder.exists() and not job.job_dir.exists()
    assert not any(job.run_id in p.name for p in (tmp_path / "artifacts").rglob("*"))


def test_training_refused_before_it_begins_removes_the_layers_it_wrote(tmp_path, layer_data):
    folder, data = write_training_data(TrainingData({"nuclei": layer_data[0]}, {"nuclei": layer_data[1]}), "mask", tmp_path)
    job = TrainingJob(["experiment=stardist_own_data", *data, *TINY, "data.patch_size=[60,60]"], tmp_path, discard=[folder])
    with pytest.raises(BioflowError, match="patch_size"):
        job.run()
    assert not folder.exists() and list_runs(tmp_path) == []


def test_a_stack_of_frames_trains_a_2d_model(tmp_path, layer_data):
    """A (T, Y, X) layer with its labels: the axes reach the TIFF reader, frames are images."""
    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image

    second = synthetic_nuclei_image((128, 128), seed=0, index=1)
    images, labels = np.stack([layer_data[0], second[0]]), np.stack([layer_data[1], second[1]])
    folder, data = write_training_data(TrainingData({"movie": images}, {"movie": labels}, axes="TYX"), "mask", tmp_path)
    summary = TrainingJob(["experiment=stardist_own_data", *data, *TINY, "trainer.max_epochs=1"], tmp_path).run()
    assert summary["test"] and list_runs(tmp_path)[0].run_id == summary["run_id"]


def test_no_store_lists_nothing_and_creates_nothing(tmp_path):
    assert list_runs(tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_the_3d_sample_trains_stardist3d_from_layers(tmp_path):
    """The plugin's own 3D sample, as the Train widget passes it (about 40 s)."""
    from bioflow.napari.layers import training_axes
    from bioflow.napari.sample_data import nuclei_3d

    (image, meta, _), (labels, _, _) = nuclei_3d()
    axes = training_axes(image.shape, (3,))
    folder, data = write_training_data(TrainingData({"nuclei 3d": image}, {"nuclei 3d": labels}, axes=axes), "mask", tmp_path)
    summary = TrainingJob(["experiment=demo_stardist3d", *data, "trainer.max_epochs=1", "data.patches_per_epoch=4",
                           "data.batch_size=2", "data.patch_size=[16,64,64]", "model.base_channels=4", "data.num_workers=0"],
                          tmp_path).run()
    assert axes == "ZYX" and summary["test"] and list_runs(tmp_path)[0].task == "stardist3d"
