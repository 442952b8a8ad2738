"""`bioflow export`: bioimage.io packages that pass bioimageio.core's test and predict like their checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

import bioflow
pytest.importorskip("bioimageio.core")

from bioflow.checkpoint import load_checkpoint  # noqa: E402
from bioflow.loading import task_from_checkpoint  # noqa: E402
from bioflow.cli import main  # noqa: E402
from bioflow.bioimageio import networks  # noqa: E402
from bioflow.bioimageio.export import check_package  # noqa: E402
from bioflow.bioimageio.package import open_package  # noqa: E402
from bioflow.bioimageio.runtime import PackageModel, load_package  # noqa: E402
from bioflow.prediction import predict  # noqa: E402
from tests.bioimageio.models import data_checkpoint, nuclei, nuclei3d  # noqa: E402


def export(checkpoint: Path, out: Path, *extra: str) -> Path:
    code = main(["export", str(checkpoint), "--out", str(out), "--project-dir", str(out.parent / "runs"), *extra])
    assert code == 0
    return out


def rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as archive:
        return yaml.safe_load(archive.read("rdf.yaml"))


def image(shape, seed=0) -> np.ndarray:
    from scipy import ndimage

    noise = np.random.default_rng(seed).normal(size=shape)
    return (ndimage.gaussian_filter(noise, 2.0) * 400 + 600).clip(0, None).astype(np.uint16)


def stream(model, data: np.ndarray, **options) -> np.ndarray:
    """All strips a predictor (task or package) hands to its sink, as one array."""
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        model.predict_array(data, sink=lambda start, block: parts.append(block.float().cpu()), **options)
    return torch.cat(parts, dim=1).numpy()


def tensors(package: Path) -> PackageModel:
    """The package's own output tensors, through bioimageio.core's pre- and post-processing (how
    tools other than bioflow see it)."""
    return PackageModel(open_package(str(package)), str(package))


def core_prediction(package: Path, data: np.ndarray) -> dict[str, np.ndarray]:
    """bioimageio.core's own prediction of a whole (valid-size) image, padded by nothing, as
    ``bioimageio test`` reproduces its test outputs."""
    from bioimageio.core import create_prediction_pipeline
    from bioimageio.core.digest_spec import create_sample_for_model
    from bioimageio.spec import load_model_description

    descr = load_model_description(package, perform_io_checks=False)
    with create_prediction_pipeline(descr) as pipeline:
        sample = create_sample_for_model(descr, inputs={"raw": data[None].astype(np.float32)}, sample_id="s")
        out = pipeline.predict_sample_without_blocking(sample, skip_input_padding=True, skip_output_cropping=True)
    return {str(k): np.asarray(v.data.values)[0] for k, v in out.members.items()}


def max_relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segmentation")
    checkpoint = data_checkpoint(folder / "model.ckpt", "segmentation")
    package = export(checkpoint, folder / "model.zip", "--author", "Ada Lovelace", "--license", "MIT",
                     "--cite", "Our paper=10.1234/abcd")
    return checkpoint, package


def test_the_package_passes_bioimageio_test(segmentation):
    passed, line = check_package(segmentation[1])
    assert passed, line


def test_the_package_describes_the_model(segmentation):
    description = rdf(segmentation[1])
    (inp,), (out,) = description["inputs"], description["outputs"]
    assert [a.get("id", a["type"]) for a in inp["axes"]] == ["batch", "channel", "y", "x"]
    task = task_from_checkpoint(load_checkpoint(segmentation[0]), "model")
    assert inp["axes"][2]["size"]["step"] == task.size_multiple
    assert out["axes"][2]["halo"] == (task.receptive_field() + 1) // 2
    assert inp["axes"][2]["size"]["min"] - 2 * out["axes"][2]["halo"] >= 1
    ops = [p["id"] for p in inp["preprocessing"]]
    assert "scale_range" in ops and "softmax" in [p["id"] for p in out["postprocessing"]]
    assert set(description["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    assert description["authors"] == [{"name": "Ada Lovelace"}] and description["license"] == "MIT"
    assert description["cite"][0] == {"text": "Our paper", "doi": "10.1234/abcd"}
    assert description["config"]["bioflow"]["task"] == "segmentation"
    with zipfile.ZipFile(segmentation[1]) as archive:
        readme = archive.read("README.md").decode()
    assert "nuclei_0003" in readme  # test tensors from the recorded test split
    assert "Receptive field" in readme and "MIT" in readme


def test_the_architecture_source_needs_only_torch(segmentation, tmp_path):
    """The state dict loads into the module built from architecture.py in a Python where bioflow
    cannot be imported, and reproduces the test output."""
    with zipfile.ZipFile(segmentation[1]) as archive:
        archive.extractall(tmp_path)
    weights = rdf(segmentation[1])["weights"]["pytorch_state_dict"]
    script = f"""
import sys, json, importlib.util, numpy as np, torch
sys.modules['bioflow'] = None  # importing bioflow now fails
spec = importlib.util.spec_from_file_location('arch', 'architecture.py')
arch = importlib.util.module_from_spec(spec); spec.loader.exec_module(arch)
net = getattr(arch, {weights['architecture']['callable']!r})(**json.loads({json.dumps(json.dumps(weights['architecture']['kwargs']))}))
net.load_state_dict(torch.load('weights.pt', weights_only=True), strict=True)
x = np.load('test_input.npy')
lo, hi = np.percentile(x, [1, 99.8], axis=(2, 3), keepdims=True)
with torch.no_grad():
    out = net.eval()(torch.from_numpy(((x - lo) / (hi - lo + 1e-6)).astype(np.float32))).softmax(1).numpy()
print(float(np.abs(out - np.load('test_output_probabilities.npy')).max()))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1e-4


def test_a_source_that_imports_bioflow_is_refused():
    networks.check_torch_only("import torch\nfrom torch import nn\nimport math\n")
    with pytest.raises(Exception, match="imports bioflow"):
        networks.check_torch_only("import torch\nfrom bioflow.registry import registry\n")


def test_the_package_predicts_like_the_checkpoint(segmentation, tmp_path):
    """Round trip: bioflow predict on the package writes the checkpoint's class map; the package
    rebuilt as its task gives the checkpoint's raw output, and its tensors the checkpoint's class
    probabilities, to 1e-5."""
    checkpoint, package = segmentation
    data = image((150, 133))
    tifffile.imwrite(tmp_path / "a.tif", data)
    for model, out in ((checkpoint, "from_checkpoint"), (package, "from_package")):
        predict(str(model), [str(tmp_path / "a.tif")], str(tmp_path / out), project_dir=str(tmp_path), tile_size=[64],
                progress=False)
    assert np.array_equal(tifffile.imread(tmp_path / "from_package" / "a.tif"), tifffile.imread(tmp_path / "from_checkpoint" / "a.tif"))
    task = task_from_checkpoint(load_checkpoint(checkpoint), "model")
    raw = stream(task, data[None], tile_size=[64])
    assert max_relative(stream(load_package(str(package)), data[None], tile_size=[64]), raw) < 1e-5
    expected = torch.from_numpy(raw).softmax(0).numpy()
    assert max_relative(stream(tensors(package), data[None], tile_size=[64]), expected) < 1e-5


def test_the_package_predicts_like_bioimageio_core(segmentation):
    """bioflow's tiled prediction of the package equals bioimageio.core's whole-image prediction."""
    data = image((1, 112, 136), seed=3)
    expected = core_prediction(segmentation[1], data)["probabilities"]
    for tile in (48, 256):
        assert max_relative(stream(tensors(segmentation[1]), data, tile_size=[tile]), expected) < 1e-4


def test_evaluating_the_package_gives_the_checkpoints_metrics(segmentation, tmp_path):
    from bioflow.evaluation import evaluate

    checkpoint, package = segmentation
    of_checkpoint = evaluate(str(checkpoint), project_dir=str(tmp_path), log_to_run=False)["metrics"]
    of_package = evaluate(str(package), project_dir=str(tmp_path), log_to_run=False)["metrics"]
    assert of_package.keys() == of_checkpoint.keys() and "test/dice_nucleus" in of_package
    for key, value in of_checkpoint.items():
        assert of_package[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_export_refuses_to_overwrite_and_odd_outputs(segmentation, tmp_path, capsys):
    checkpoint, package = segmentation
    before = package.read_bytes()
    assert main(["export", str(checkpoint), "--out", str(package), "--project-dir", str(tmp_path)]) == 2
    assert "exists already" in capsys.readouterr().err and package.read_bytes() == before
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "model.tar"), "--project-dir", str(tmp_path)]) == 2
    assert ".zip" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "m.zip"), "--cite", "no reference",
                 "--project-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--cite" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "m.zip").exists()


def test_a_missing_extra_is_one_line(segmentation, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bioimageio.core", None)  # as if not installed
    assert main(["export", str(segmentation[0]), "--out", str(tmp_path / "m.zip"), "--project-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'bioflow[bioimageio]'" in err and len(err.splitlines()) == 1
    tifffile.imwrite(tmp_path / "a.tif", image((64, 64)))
    assert main(["predict", str(segmentation[1]), str(tmp_path / "a.tif"), "--out", str(tmp_path / "o")]) == 2
    assert "bioflow[bioimageio]" in capsys.readouterr().err


# StarDist and the plugin's task (the exchange hooks' defaults) run by default; the others are slow.
@pytest.mark.parametrize("kind", ["stardist", "plugin_task", *(pytest.param(k, marks=pytest.mark.slow) for k in (
    "care", "n2v", "segmentation_3d", "stardist_3d", "plugin"))])
def test_every_task_exports_a_package_that_predicts_like_its_checkpoint(kind, tmp_path):
    if kind.startswith("plugin"):
        pytest.importorskip("bioflow_example_plugin")
    checkpoint = data_checkpoint(tmp_path / "model.ckpt", kind)
    package = export(checkpoint, tmp_path / "model.zip")
    passed, line = check_package(package)
    assert passed, line
    description = rdf(package)
    dims = 3 if kind.endswith("_3d") else 2
    tile = [32 if dims == 3 else 64]
    if kind == "stardist_3d":
        data = nuclei3d((20, 44, 52), seed=5)
    else:
        data = image((20, 44, 52), seed=5) if dims == 3 else nuclei((130, 118), seed=5)
    tifffile.imwrite(tmp_path / "a.tif", data, ome=True, metadata={"axes": "ZYX"[-dims:]})
    for model, out in ((checkpoint, "from_checkpoint"), (package, "from_package")):
        predict(str(model), [str(tmp_path / "a.tif")], str(tmp_path / out), project_dir=str(tmp_path), tile_size=tile,
                progress=False)
    expected, actual = (tifffile.imread(tmp_path / o / "a.tif") for o in ("from_checkpoint", "from_package"))
    task = task_from_checkpoint(load_checkpoint(checkpoint), "model")
    # the Python API takes the package too, and gives what bioflow predict wrote
    in_python = bioflow.load_model(str(package)).predict(data, tile_size=tile)
    assert np.array_equal(np.squeeze(in_python[next(iter(in_python))]), np.squeeze(actual))
    if kind in ("care", "n2v", "plugin_task"):
        assert max_relative(actual, expected) < 1e-5
    elif kind.startswith("stardist"):
        # the probabilities and distances agree to 1e-5; polygons are drawn from them, so pixels
        # where two overlapping polygons meet may fall to either
        raw = stream(task, data[None], tile_size=tile)
        assert max_relative(stream(load_package(str(package)), data[None], tile_size=tile), raw) < 1e-5
        if dims == 2:  # the package's own tensors (a volume this thin is below the package's valid size)
            activated = task.activate(torch.from_numpy(raw)).numpy()
            assert max_relative(stream(tensors(package), data[None], tile_size=tile), activated) < 1e-5
        assert len(np.unique(actual)) == len(np.unique(expected)) > 5 and (actual == expected).mean() > 0.998
        prob, nms = (float(t) for t in task.thresholds)
        assert description["config"]["stardist"]["thresholds"] == {"prob": pytest.approx(prob), "nms": pytest.approx(nms)}
        assert description["config"]["stardist"]["config"]["n_dim"] == dims
        assert [o["id"] for o in description["outputs"]] == ["prob", "dist"]
    else:
        assert np.array_equal(actual, expected)
    if kind == "care":
        assert [p["id"] for p in description["outputs"][0]["postprocessing"]] == ["scale_linear", "ensure_dtype"]
    if kind == "plugin":
        assert "pytorch_state_dict" not in description["weights"] and "torchscript" in description["weights"]
    if kind == "plugin_task":  # a task with no exchange hooks of its own: the defaults
        assert [o["id"] for o in description["outputs"]] == ["output"]
        assert description["config"]["bioflow"]["components"]["task"]["distribution"] == "bioflow-example-plugin"
    # bioflow evaluate scores the package as its checkpoint
    from bioflow.evaluation import evaluate

    of_checkpoint = evaluate(str(checkpoint), project_dir=str(tmp_path), log_to_run=False)["metrics"]
    of_package = evaluate(str(package), project_dir=str(tmp_path), log_to_run=False)["metrics"]
    assert of_package.keys() == of_checkpoint.keys() and of_package
    for key, value in of_checkpoint.items():
        assert of_package[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("kind", ["care_probabilistic", "n2v_probabilistic"])
def test_a_probabilistic_model_exports_its_calibrated_std_as_a_second_output(kind, tmp_path):
    """The package's network computes the recalibrated std (fitted knots, not the identity), in the
    input's units through the format's post-processing (fixed normalisation) or through bioflow's
    record (per-image normalisation); bioflow predicts the package as the checkpoint, uncertainty
    included, and other tools see two outputs."""
    checkpoint = data_checkpoint(tmp_path / "model.ckpt", kind)
    saved = torch.load(checkpoint, weights_only=True)
    knots = saved["state_dict"]["calibration_knots"]
    saved["state_dict"]["calibration_knots"] = torch.stack([knots[0], knots[1] * torch.linspace(0.5, 3.0, knots.shape[1])])
    if kind.startswith("n2v"):  # a fitted noise model: the signal's std comes with the package too
        saved["state_dict"]["noise_model"] = torch.tensor([[0.5, 10.0]])
    torch.save(saved, checkpoint)
    package = export(checkpoint, tmp_path / "model.zip")
    passed, line = check_package(package)
    assert passed, line
    description = rdf(package)
    assert [o["id"] for o in description["outputs"]] == ["restored", "uncertainty"]
    data = image((96, 104), seed=5)
    tifffile.imwrite(tmp_path / "a.tif", data)
    for model, out in ((checkpoint, "c"), (package, "p")):
        predict(str(model), [str(tmp_path / "a.tif")], str(tmp_path / out), project_dir=str(tmp_path), tile_size=[64],
                progress=False)
    for name in ("a.tif", "a_uncertainty.tif", *(["a_signal_uncertainty.tif"] if kind.startswith("n2v") else [])):
        expected, actual = (tifffile.imread(tmp_path / o / name) for o in ("c", "p"))
        assert max_relative(actual, expected) < 1e-5, name
    # other tools: the package's tensors after its own post-processing
    task = task_from_checkpoint(load_checkpoint(checkpoint), "model")
    outside = stream(tensors(package), data[None], tile_size=[64])
    std = tifffile.imread(tmp_path / "c" / "a_uncertainty.tif")
    if kind.startswith("care"):  # fixed normalisation: the format maps the std back (scale, no offset)
        assert description["outputs"][1]["postprocessing"][0]["kwargs"]["offset"] == 0.0
        assert max_relative(outside[1], std) < 1e-5
    else:  # per-image normalisation: bioflow's record says the std takes the input's percentile range
        assert description["config"]["bioflow"]["per_image_scale"] == ["uncertainty"]
        assert max_relative(outside[1], std) < 1e-5
    assert task.distribution is not None
    # bioflow evaluate of the package measures the calibration as of the checkpoint (the std as
    # the package gives it, not recalibrated twice)
    from bioflow.evaluation import evaluate

    of_checkpoint = evaluate(str(checkpoint), project_dir=str(tmp_path), log_to_run=False)["metrics"]
    of_package = evaluate(str(package), project_dir=str(tmp_path), log_to_run=False)["metrics"]
    key = "test/calibration_mean_abs_log_ratio"
    assert of_package[key] == pytest.approx(of_checkpoint[key], rel=1e-3, abs=1e-4)


def test_a_package_written_before_the_task_state_predicts_as_its_checkpoint(tmp_path):
    """Packages of the previous release have no task state, components or per-image list in
    config.bioflow: StarDist's thresholds then come from config.stardist, as they did."""
    checkpoint = data_checkpoint(tmp_path / "model.ckpt", "stardist")
    package = export(checkpoint, tmp_path / "model.zip")
    old = tmp_path / "old.zip"
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "rdf.yaml":
                description = yaml.safe_load(data)
                for key in ("task_state", "components", "per_image_units"):
                    description["config"]["bioflow"].pop(key)
                data = yaml.safe_dump(description, sort_keys=False).encode()
            target.writestr(item, data)
    data = nuclei((130, 118), seed=5)
    tifffile.imwrite(tmp_path / "a.tif", data)
    for model, out in ((checkpoint, "from_checkpoint"), (old, "from_old_package")):
        predict(str(model), [str(tmp_path / "a.tif")], str(tmp_path / out), project_dir=str(tmp_path), tile_size=[64],
                progress=False)
    expected, actual = (tifffile.imread(tmp_path / o / "a.tif") for o in ("from_checkpoint", "from_old_package"))
    assert len(np.unique(expected)) > 5 and (actual == expected).mean() > 0.998
    task = task_from_checkpoint(load_checkpoint(checkpoint), "model")
    assert torch.allclose(load_package(str(old)).thresholds, task.thresholds)


def test_a_package_is_not_exported_again(segmentation, tmp_path, capsys):
    assert main(["export", str(segmentation[1]), "--out", str(tmp_path / "again.zip"), "--project-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a bioimage.io package already" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "again.zip").exists()
