"""The Python API: the examples of docs/python-api.md run as written, and the API's own checks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO

DOC = REPO / "docs" / "python-api.md"


def doc_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_documented_examples_run(tmp_path, monkeypatch):
    examples = doc_examples()
    assert len(examples) >= 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOFLOW_PROJECT_DIR", str(tmp_path / "runs"))
    namespace: dict = {}
    for code in examples:  # one namespace: later examples use what earlier ones made
        exec(compile(code, str(DOC), "exec"), namespace)
    summary, tuned = namespace["summary"], namespace["tuned"]
    assert (tmp_path / "predictions" / "nuclei.tif").is_file()
    assert namespace["frames"].shape == (2, 128, 160)
    np.testing.assert_array_equal(namespace["frames"][0], namespace["labels"])  # frame 0 is the image itself
    from mlflow.tracking import MlflowClient

    run = MlflowClient(summary["tracking_uri"]).get_run(tuned["run_id"])
    assert run.data.tags["bioflow.init_from"] == summary["run_id"]


def test_model_predict_checks_its_input(tmp_path):
    import bioflow
    from bioflow.errors import BioflowError
    from bioflow.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "m.ckpt", "experiment=demo_unet", "model.depth=1", "model.base_channels=4")
    model = bioflow.load_model(path, device="cpu")
    assert model.outputs == ["labels"]
    out = model.predict(np.random.default_rng(0).random((40, 36)).astype(np.float32))
    assert out["labels"].shape == (40, 36)
    channel_last = model.predict(np.random.default_rng(0).random((40, 36, 1)).astype(np.float32), axes="YXC")
    assert channel_last["labels"].shape == (40, 36)
    with pytest.raises(BioflowError, match="give its axes"):
        model.predict(np.zeros((2, 3, 40, 36), np.float32))
    with pytest.raises(BioflowError, match="--tile-size"):
        model.predict(np.zeros((40, 36), np.float32), tile_size=[0])
    with pytest.raises(BioflowError, match="device"):
        bioflow.load_model(path, device="banana")


def test_model_predict_takes_the_channels_the_model_was_trained_on(tmp_path):
    """A model trained on one channel (data.channels=[1]) of two-channel images predicts a
    two-channel array as bioflow predict does a two-channel file: from that channel."""
    import tifffile

    import bioflow
    from bioflow.errors import BioflowError
    from bioflow.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "m.ckpt", "experiment=demo_unet", "model.depth=1", "model.base_channels=4",
                           "data.channels=[1]")
    model = bioflow.load_model(path, device="cpu")
    rng = np.random.default_rng(1)
    two = np.stack([rng.random((40, 36)), rng.random((40, 36)) * 3]).astype(np.float32)
    from_array = model.predict(two)["labels"]  # default axes: CYX
    tifffile.imwrite(tmp_path / "two.tif", two, ome=True, metadata={"axes": "CYX"})
    bioflow.predict(str(path), [str(tmp_path / "two.tif")], str(tmp_path / "out"), device="cpu")
    assert np.array_equal(from_array, tifffile.imread(tmp_path / "out" / "two.tif"))
    with pytest.raises(BioflowError, match="channel 1 does not exist in the image"):
        model.predict(two[:1])
