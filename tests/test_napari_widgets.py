"""The napari widgets driven headless (pytest-qt and napari's ``make_napari_viewer``, under Xvfb):
predicting adds the layers ``bioflow predict`` writes, training from layers makes a run the predict
widget lists, cancel keeps nothing, bad input is a message in the viewer.

Needs ``pip install 'bioflow[napari-test]'`` and a display (``scripts/test.sh`` runs the tests
under ``xvfb-run`` and installs Debian's Xvfb where it can); skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp(prefix="napari-settings-")) / "settings.yaml"))
pytest.importorskip("napari", reason="napari is an optional extra: pip install 'bioflow[napari-test]'")
pytest.importorskip("pytestqt", reason="pytest-qt drives the widgets: pip install 'bioflow[napari-test]'")
if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
    pytest.skip("no display: run under xvfb-run (scripts/test.sh does)", allow_module_level=True)

from mlflow.tracking import MlflowClient  # noqa: E402

import bioflow  # noqa: E402
from bioflow.data.synthetic_nuclei import synthetic_nuclei_image  # noqa: E402

TINY = ["trainer.max_epochs=2", "data.patches_per_epoch=8", "data.batch_size=4", "data.patch_size=[64,64]",
        "model.base_channels=8", "data.num_workers=0"]
WAIT = 120_000  # ms


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny StarDist run in its own project (enough steps to find nuclei), and a held-out image."""
    project = tmp_path_factory.mktemp("napari-project")
    summary = bioflow.train(["experiment=demo_stardist", "data.source.n_images=6", "data.source.shape=[96,96]",
                             f"project_dir={project}", *TINY, "trainer.max_epochs=10", "data.patches_per_epoch=48"])
    image, _ = synthetic_nuclei_image((128, 160), seed=5, index=0)
    return project, summary["run_id"], image


def open_widget(viewer, name: str):
    _, widget = viewer.window.add_plugin_dock_widget("bioflow", name)
    return widget


def finish(qtbot, widget) -> None:
    qtbot.waitUntil(lambda: widget.worker is None and getattr(widget, "loader", None) is None, timeout=WAIT)


def choose_run(widget, project: Path, run_id: str) -> None:
    widget.project.value = project
    widget.run.value = next(label for label, choice in widget._runs.items() if choice.run_id == run_id)


def test_sample_data_opens_for_every_widget(make_napari_viewer):
    viewer = make_napari_viewer()
    for key, names in (("nuclei_2d", ["nuclei", "nuclei labels"]), ("nuclei_3d", ["nuclei 3d", "nuclei 3d labels"]),
                       ("noisy", ["noisy", "clean"])):
        viewer.open_sample("bioflow", key)
        assert all(n in viewer.layers for n in names)
    assert viewer.layers["nuclei 3d"].data.ndim == 3 and viewer.layers["nuclei labels"].data.max() > 5


def test_the_manifest_is_valid():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("bioflow")
    assert {w.display_name for w in manifest.contributions.widgets} == {"Predict", "Train"}
    assert {s.key for s in manifest.contributions.sample_data} == {"nuclei_2d", "nuclei_3d", "noisy"}
    manifest.validate_imports()  # every command's python_name imports
    npe2 = Path(sys.executable).with_name("npe2")
    if npe2.exists():
        done = subprocess.run([str(npe2), "validate", "bioflow"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "valid" in done.stdout, done.stdout + done.stderr


def test_predicting_adds_the_layers_bioflow_predict_writes(make_napari_viewer, qtbot, trained, tmp_path):
    project, run_id, image = trained
    viewer = make_napari_viewer()
    viewer.add_image(image, name="held out", scale=(0.5, 0.5))
    widget = open_widget(viewer, "Predict")
    choose_run(widget, project, run_id)
    widget.image.value = "held out"
    qtbot.waitUntil(lambda: widget.has_thresholds, timeout=WAIT)  # StarDist: its thresholds, once the run is chosen
    assert widget.prob.value == pytest.approx(widget._models[run_id].task.thresholds[0].item(), abs=0.005)
    widget.predict()
    finish(qtbot, widget)
    labels = viewer.layers[f"held out labels ({run_id[:8]})"]
    assert list(labels.scale) == [0.5, 0.5]

    tifffile.imwrite(tmp_path / "held_out.tif", image)
    written = bioflow.predict(run_id, [tmp_path / "held_out.tif"], tmp_path / "out", project_dir=project, record=False)
    expected = tifffile.imread(written[0]["labels"])
    assert labels.data.max() > 0 and np.array_equal(labels.data, expected)
    table = labels.features
    assert list(table["index"]) == sorted(np.unique(expected[expected > 0]).tolist())
    assert (table["probability"] >= widget.prob.value - 1e-6).all()

    before = int(labels.data.max())
    widget.prob.value = 0.95  # a stricter threshold: fewer objects
    widget.predict()
    finish(qtbot, widget)
    assert int(viewer.layers[-1].data.max()) <= before
    assert widget.prob.value == 0.95 and "thresholds 0.95" in widget.status.value  # the user's value stays

    viewer.add_image([image, image[::2, ::2]], multiscale=True, name="pyramid", translate=(5, 7))
    widget.image.value = "pyramid"
    widget.prob.value = widget._shown_thresholds[0]
    widget.predict()
    finish(qtbot, widget)
    pyramid = viewer.layers[-1]
    assert pyramid.name.startswith("pyramid labels") and pyramid.data.shape == image.shape  # the full resolution
    assert list(pyramid.translate) == [5, 7] and np.array_equal(pyramid.data, expected)


def test_an_rgb_layer_keeps_its_place(make_napari_viewer, qtbot, tmp_path):
    from bioflow.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "rgb.ckpt", "experiment=demo_unet", "model.depth=1", "model.base_channels=4",
                           in_channels=3)
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), rgb=True, name="rgb",
                     scale=(0.5, 0.5), translate=(10, 10))
    viewer.add_image(np.zeros((64, 64), np.uint8), name="grey")
    widget = open_widget(viewer, "Predict")
    widget.file.value = path
    widget.image.value = "rgb"
    widget.predict()
    finish(qtbot, widget)
    labels = viewer.layers[-1]
    assert labels.data.shape == (64, 64) and list(labels.scale) == [0.5, 0.5] and list(labels.translate) == [10, 10]
    widget.image.value = "grey"  # a one-channel image for a three-channel model
    widget.predict()
    finish(qtbot, widget)
    assert widget.status.value.startswith("grey: one channel of shape (64, 64) for a model of 3 channels")
    assert len(viewer.layers) == 3


def test_cancel_adds_no_layer(make_napari_viewer, qtbot, trained):
    project, run_id, _ = trained
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((1024, 1024)).astype(np.float32), name="big")
    widget = open_widget(viewer, "Predict")
    choose_run(widget, project, run_id)
    widget.tile.value = 64
    widget.relay.progressed.connect(lambda done, total: widget.cancel())
    widget.predict()
    finish(qtbot, widget)
    assert [layer.name for layer in viewer.layers] == ["big"]
    assert widget.status.value.startswith("cancelled")


def test_training_from_layers_makes_a_run_the_predict_widget_lists(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    image, labels = synthetic_nuclei_image((128, 128), seed=0, index=0)
    viewer.add_image(image, name="cells")
    viewer.add_labels(labels, name="cells labels")
    predict = open_widget(viewer, "Predict")
    predict.project.value = tmp_path
    train = open_widget(viewer, "Train")
    train.project.value = tmp_path
    train.task.value = "stardist"
    train.image.value, train.target.value = "cells", "cells labels"
    train.epochs.value, train.steps.value, train.batch.value, train.patch.value = 4, 2, 4, "64,64"
    train.more.value = "model.base_channels=8 data.num_workers=0"
    train.relay.event.connect(lambda kind, *_: train.stop_early() if kind == "validation" else None)
    train.train()
    finish(qtbot, train)
    run_id = train.summary["run_id"]
    assert train.curves.loss and 1 <= len(train.curves.validation) < 4  # the curves drawn; stopped early
    assert all("val/loss" in metrics for _, metrics in train.curves.validation)
    assert train.summary["best_checkpoint"] and Path(train.summary["best_checkpoint"]).is_file()
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["bioflow.task"] == "stardist"
    assert any(k.startswith("test/") for k in run.data.metrics)  # tested like a CLI run
    assert any(choice.run_id == run_id for choice in predict._runs.values())  # listed without a refresh click
    assert (tmp_path / "napari-data").is_dir()
    finish(qtbot, predict)  # it loads the new run to show its settings


def test_cancelled_training_leaves_no_run(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("bioflow", "noisy")
    train = open_widget(viewer, "Train")
    train.project.value = tmp_path
    train.task.value = "n2v"
    assert not train.has_target()  # Noise2Void learns from the noisy image alone
    train.image.value = "noisy"
    train.epochs.value, train.steps.value, train.batch.value, train.patch.value = 3, 2, 4, "64,64"
    train.more.value = "model.base_channels=8 data.num_workers=0"
    train.relay.event.connect(lambda *_: train.cancel())
    train.train()
    finish(qtbot, train)
    assert train.summary is None and train.status.value.startswith("cancelled")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert not any((tmp_path / "napari-data").iterdir())


def test_bad_input_is_a_message_and_nothing_is_lost(make_napari_viewer, qtbot, trained):
    project, run_id, _ = trained
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 4, 64, 64), np.float32), name="4d")
    widget = open_widget(viewer, "Predict")
    choose_run(widget, project, run_id)
    widget.image.value = "4d"
    widget.predict()
    finish(qtbot, widget)
    assert "4d: 4D data of shape (3, 4, 64, 64) for a 2D model" in widget.status.value
    assert [layer.name for layer in viewer.layers] == ["4d"]

    from bioflow.testing import make_checkpoint

    viewer.add_image(np.ones((64, 64), np.float32), name="flat")
    widget.file.value = make_checkpoint(project / "3d.ckpt", "experiment=demo_stardist3d", "model.base_channels=4",
                                        spatial_dims=3)
    widget.image.value = "flat"
    widget.predict()
    finish(qtbot, widget)
    assert "flat: 2D data of shape (64, 64) for a 3D model" in widget.status.value, widget.status.value
    assert [layer.name for layer in viewer.layers] == ["4d", "flat"]
    viewer.layers.remove("flat")

    widget.file.value = project / "missing.ckpt"  # a model file that is not there
    widget.predict()
    finish(qtbot, widget)
    assert "missing.ckpt" in widget.status.value and len(viewer.layers) == 1

    train = open_widget(viewer, "Train")
    viewer.add_image(np.ones((64, 64), np.float32), name="cells")
    viewer.add_labels(np.ones((32, 32), np.int32), name="small labels")
    viewer.add_labels(np.zeros((64, 64), np.int32), name="empty labels")
    train.project.value = project
    train.task.value = "stardist"
    train.image.value = "cells"
    runs_before = len(MlflowClient(f"sqlite:///{project / 'mlflow.db'}").search_runs(["0", "1", "2"]))
    for target, words in (("small labels", "does not match the image"), ("empty labels", "has no labelled object")):
        train.target.value = target
        train.train()
        assert words in train.status.value and train.worker is None
    assert len(MlflowClient(f"sqlite:///{project / 'mlflow.db'}").search_runs(["0", "1", "2"])) == runs_before
    assert np.array_equal(viewer.layers["cells"].data, np.ones((64, 64), np.float32))  # the user's layers untouched

    train.source.value = "folders"  # folders not chosen: a message, not a run on the working folder
    train.train()
    assert train.status.value == "train: choose the images folder" and train.worker is None
    train.images.value = project
    train.train()
    assert train.status.value == "train: choose the masks folder" and train.worker is None
