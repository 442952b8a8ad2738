"""`bioflow predict` on bioimage.io packages of other tools: equal to bioimageio.core's prediction;
bad packages: one line, non-zero exit."""

from __future__ import annotations

import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip("bioimageio.core")

from bioflow.cli import main  # noqa: E402
from bioflow.bioimageio.package import is_package  # noqa: E402

NET = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """Three 3x3 convolutions (each output pixel sees 7x7 input pixels), from channel-last input
    (batch, y, x, channel) to channel-first output."""

    def __init__(self, width=4, classes=2):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(width, classes, 3, padding=1))

    def forward(self, x):
        return self.body(x.permute(0, 3, 1, 2))
'''
HALO = 4  # >= 3, the reach of the net on either side
GAIN, OFFSET, LOW, HIGH = 2.0, 1.0, 5.0, 95.0


def _reference(x: np.ndarray, net) -> np.ndarray:
    """What the package computes, written out: percentiles per sample, the net, a fixed gain."""
    lo, hi = np.percentile(x, [LOW, HIGH], axis=(1, 2), keepdims=True)
    normalised = ((x - lo) / (hi - lo + 1e-6)).astype(np.float32)
    with torch.no_grad():
        out = net(torch.from_numpy(normalised)).numpy()
    return out * GAIN + OFFSET


@pytest.fixture(scope="module")
def foreign_package(tmp_path_factory) -> Path:
    """A package as another tool would write it, built with bioimageio.spec's own description
    classes: channel-last input, percentile preprocessing, fixed output scaling, a halo."""
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    folder = tmp_path_factory.mktemp("foreign")
    (folder / "tiny_net.py").write_text(textwrap.dedent(NET))
    namespace: dict = {}
    exec(textwrap.dedent(NET), namespace)
    torch.manual_seed(0)
    net = namespace["TinyNet"]().eval()
    torch.save(net.state_dict(), folder / "weights.pt")
    x = np.random.default_rng(0).gamma(2.0, 50.0, (1, 32, 40, 1)).astype(np.float32)
    np.save(folder / "input.npy", x)
    np.save(folder / "output.npy", _reference(x, net).astype(np.float32))
    in_id, out_id = spec.TensorId("image"), spec.TensorId("scores")
    size = spec.ParameterizedSize(min=16, step=8)
    descr = spec.ModelDescr(
        name="tiny foreign model",
        description="a model of another tool, for bioflow's tests",
        authors=[spec.Author(name="Another Tool")],
        cite=[spec.CiteEntry(text="none", doi=spec.Doi("10.1234/abcd"))],
        license=spec.LicenseId("MIT"),
        documentation=spec.FileDescr(source=_write(folder / "README.md", "# tiny\n")),
        inputs=[spec.InputTensorDescr(
            id=in_id,
            axes=[spec.BatchAxis(), spec.SpaceInputAxis(id=spec.AxisId("y"), size=size),
                  spec.SpaceInputAxis(id=spec.AxisId("x"), size=size),
                  spec.ChannelAxis(channel_names=[spec.Identifier("intensity")])],
            test_tensor=spec.FileDescr(source=folder / "input.npy"),
            preprocessing=[spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(
                axes=[spec.AxisId("y"), spec.AxisId("x")], min_percentile=LOW, max_percentile=HIGH))],
        )],
        outputs=[spec.OutputTensorDescr(
            id=out_id,
            axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier("a"), spec.Identifier("b")]),
                  *[spec.SpaceOutputAxisWithHalo(id=spec.AxisId(a), halo=HALO,
                                                 size=spec.SizeReference(tensor_id=in_id, axis_id=spec.AxisId(a)))
                    for a in "yx"]],
            test_tensor=spec.FileDescr(source=folder / "output.npy"),
            postprocessing=[spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=GAIN, offset=OFFSET))],
        )],
        weights=spec.WeightsDescr(pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
            source=folder / "weights.pt", pytorch_version=spec.Version(torch.__version__.split("+")[0]),
            architecture=spec.ArchitectureFromFileDescr(source=folder / "tiny_net.py", callable=spec.Identifier("TinyNet"),
                                                        kwargs={"width": 4, "classes": 2}),
        )),
    )
    return Path(save_bioimageio_package(descr, output_path=folder / "foreign.zip"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def image(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, 80.0, shape).astype(np.uint16)


def core(package: Path, data: np.ndarray, blocks: int | None = None) -> np.ndarray:
    """bioimageio.core's prediction of a (Y, X) image, whole or in ``blocks`` (size parameter n):
    (channels, Y, X)."""
    from bioimageio.core import create_prediction_pipeline, predict
    from bioimageio.core.sample import Sample
    from bioimageio.core.tensor import Tensor
    from bioimageio.spec import load_model_description

    x = data[None, ..., None].astype(np.float32)
    if blocks is None:
        sample = predict(model=str(package), inputs={"image": x})
    else:  # any image size: core pads the last blocks
        descr = load_model_description(package)
        with create_prediction_pipeline(descr) as pipeline:
            inputs = Sample(members={"image": Tensor.from_numpy(x, dims=("batch", "y", "x", "channel"))}, stat={}, id="s")
            sample = pipeline.predict_sample_with_blocking(inputs, ns=blocks)
    return np.asarray(sample.members["scores"].data.values)[0]


def max_relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("tile", [24, 64])
def test_a_foreign_package_predicts_as_bioimageio_core_does(foreign_package, tmp_path, tile):
    data = image((72, 88))  # a valid size, so that core can predict the whole image at once
    tifffile.imwrite(tmp_path / "a.tif", data)
    code = main(["predict", str(foreign_package), str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"),
                 "--tile-size", str(tile), "--no-progress"])
    assert code == 0
    ours = tifffile.imread(tmp_path / "out" / "a.tif")
    assert ours.shape == (2, 72, 88) and ours.dtype == np.float32
    # core's predict pads the image by the halo before it takes the percentiles; so does bioflow
    assert max_relative(ours, core(foreign_package, data)) < 1e-4


def test_images_of_any_size_are_padded_to_a_valid_size(foreign_package, tmp_path):
    data = image((61, 45), seed=2)  # valid sizes are 16 + 8 n
    tifffile.imwrite(tmp_path / "a.tif", data)
    assert main(["predict", str(foreign_package), str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    ours = tifffile.imread(tmp_path / "out" / "a.tif")
    assert ours.shape == (2, 61, 45)
    # core predicts an image of this size only in blocks, and then takes the percentiles of the image
    # without the halo (its whole-image predict, which bioflow follows, takes them with it): the two
    # differ by that shift of the percentiles alone (about 5e-4 here)
    assert max_relative(ours, core(foreign_package, data, blocks=1)) < 2e-3


def _expect_one_line(capsys, *args: str, contains: str) -> None:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert contains in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_packages_give_one_line(foreign_package, tmp_path, capsys):
    tifffile.imwrite(tmp_path / "a.tif", image((32, 32)))
    args = [str(tmp_path / "a.tif"), "--out", str(tmp_path / "out")]
    (tmp_path / "corrupt.zip").write_bytes(foreign_package.read_bytes()[:300])
    _expect_one_line(capsys, "predict", str(tmp_path / "corrupt.zip"), *args, contains="not a readable zip")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as archive:
        archive.writestr("weights.pt", b"")
    _expect_one_line(capsys, "predict", str(tmp_path / "empty.zip"), *args, contains="no rdf.yaml")
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "rdf.yaml").write_text(
        "format_version: 0.3.0\ntype: dataset\nname: some images\ndescription: not a model\n"
        "authors: [{name: someone}]\ncite: [{text: a, doi: 10.1234/abcd}]\nlicense: MIT\n")
    _expect_one_line(capsys, "predict", str(tmp_path / "dataset"), *args, contains="not a model")
    (tmp_path / "junk.yaml").write_text("hello: world\n")
    _expect_one_line(capsys, "predict", str(tmp_path / "junk.yaml"), *args, contains="junk.yaml")
    _expect_one_line(capsys, "evaluate", str(foreign_package), contains="config.bioflow")
    assert not (tmp_path / "out").exists()


def test_weights_that_cannot_run_here_give_one_line(foreign_package, tmp_path, capsys):
    from bioimageio.spec import load_model_description, save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    descr = load_model_description(foreign_package)
    (tmp_path / "saved_model.zip").write_bytes(b"not really a tensorflow model")
    tf_only = descr.model_copy(update={"weights": spec.WeightsDescr(
        tensorflow_saved_model_bundle=spec.TensorflowSavedModelBundleWeightsDescr(
            source=tmp_path / "saved_model.zip", tensorflow_version=spec.Version("2.15")))})
    package = Path(save_bioimageio_package(tf_only, output_path=tmp_path / "tf.zip"))
    tifffile.imwrite(tmp_path / "a.tif", image((32, 32)))
    _expect_one_line(capsys, "predict", str(package), str(tmp_path / "a.tif"), "--out", str(tmp_path / "o"),
                     contains="cannot run here")


def test_what_counts_as_a_package(tmp_path):
    assert is_package("model.zip") and is_package("some/rdf.yaml") and not is_package("model.ckpt")
    assert not is_package("0123456789abcdef0123456789abcdef")  # an MLflow run id
    (tmp_path / "rdf.yaml").write_text("")
    assert is_package(str(tmp_path))


def test_a_foreign_package_loads_in_python_and_predicts_as_the_command_line(foreign_package, tmp_path):
    import bioflow

    data = image((72, 88), seed=4)
    tifffile.imwrite(tmp_path / "a.tif", data)
    assert main(["predict", str(foreign_package), str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    model = bioflow.load_model(str(foreign_package))
    assert "bioimage.io package" in repr(model) and model.outputs == ["scores"]
    assert np.array_equal(model.predict(data)["scores"], tifffile.imread(tmp_path / "out" / "a.tif"))
    spread = model.predict(data, tta_spread=True)  # any model: a package of another tool too
    assert np.array_equal(spread["scores"], model.predict(data, tta=True)["scores"])
    assert spread["tta_spread"].shape == (72, 88) and np.isfinite(spread["tta_spread"]).all()
    assert spread["tta_spread"].max() > 0


def test_a_foreign_package_meets_the_predictor_contract(foreign_package):
    from bioflow.bioimageio.runtime import load_package
    from bioflow.inference.predictor import Predictor

    assert isinstance(load_package(str(foreign_package)), Predictor)
