"""Screenshots of bioflow's napari widgets, from a real viewer, for docs/napari.md and the README.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/napari_screenshots.py

(needs ``pip install 'bioflow[napari]'``; on a desktop, drop ``xvfb-run``). It opens the generated
nuclei sample, trains a small StarDist model with the train widget (about a minute on a laptop CPU,
in a temporary project unless ``--project`` is given), predicts the image with the predict widget,
and writes ``napari-train.png`` and ``napari-predict.png`` (the whole window) to ``--out``
(default ``docs/images``, which git ignores: the images are made, not kept).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def wait(app, widget, timeout: float = 1800) -> None:
    """Let the viewer run until the widget's worker is done."""
    end = time.monotonic() + timeout
    while widget.worker is not None:
        if time.monotonic() > end:
            raise SystemExit("screenshots: the widget did not finish in time")
        app.processEvents()
        time.sleep(0.05)
    for _ in range(20):  # let the layers and curves draw
        app.processEvents()
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--project", type=Path, default=None, help="project folder (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    args.out.mkdir(parents=True, exist_ok=True)
    project = args.project or Path(tempfile.mkdtemp(prefix="bioflow-screenshots-"))
    app = None
    viewer = napari.Viewer(show=True, title="bioflow in napari")
    app = QApplication.instance()
    viewer.window.resize(1500, 950)
    viewer.open_sample("bioflow", "nuclei_2d")

    train_dock, train = viewer.window.add_plugin_dock_widget("bioflow", "Train")
    train.project.value = project
    train.task.value = "stardist"
    train.image.value, train.target.value = "nuclei", "nuclei labels"
    train.epochs.value, train.steps.value, train.batch.value, train.patch.value = args.epochs, 16, 4, "96,96"
    train.more.value = "model.base_channels=16 data.num_workers=0"
    train.train()
    wait(app, train)
    if train.summary is None:
        raise SystemExit(f"screenshots: training failed: {train.status.value}")
    viewer.screenshot(str(args.out / "napari-train.png"), canvas_only=False)

    viewer.window.remove_dock_widget(train_dock)
    _, predict = viewer.window.add_plugin_dock_widget("bioflow", "Predict")
    predict.project.value = project
    run_id = train.summary["run_id"]
    predict.run.value = next(label for label, choice in predict._runs.items() if choice.run_id == run_id)
    predict.image.value = "nuclei"
    viewer.layers["nuclei labels"].visible = False
    predict.predict()
    wait(app, predict)
    viewer.reset_view()
    viewer.screenshot(str(args.out / "napari-predict.png"), canvas_only=False)
    print(f"screenshots: {args.out / 'napari-train.png'}, {args.out / 'napari-predict.png'} (run {run_id} in {project})")
    viewer.close()


if __name__ == "__main__":
    main()
