"""A bioimage.io package that bioflow did not write predicts through `bioflow predict` as
bioimageio.core's own ``predict`` does: a tiny U-Net with ``zero_mean_unit_variance``
preprocessing, built here with bioimageio.spec alone (no bioflow exporter), its test output made
by bioimageio.core."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip("bioimageio.core")

NET = '''
import torch
from torch import nn


def block(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU())


class TinyUNet(nn.Module):
    """A 2-level U-Net: two 2x2 max-pools, so input sizes must be multiples of 4; an output pixel
    sees 13 input pixels each side."""

    def __init__(self, width=4):
        super().__init__()
        self.down0, self.down1 = block(1, width), block(width, 2 * width)
        self.bottom = block(2 * width, 2 * width)
        self.up1, self.up0 = block(4 * width, width), block(2 * width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        d0 = self.down0(x)
        d1 = self.down1(nn.functional.max_pool2d(d0, 2))
        b = self.bottom(nn.functional.max_pool2d(d1, 2))
        u1 = self.up1(torch.cat([nn.functional.interpolate(b, scale_factor=2.0), d1], 1))
        u0 = self.up0(torch.cat([nn.functional.interpolate(u1, scale_factor=2.0), d0], 1))
        return self.head(u0)
'''
HALO = 16  # >= the 13 pixels the net sees each side, so that tiles overlapping by it are exact
TOLERANCE = 1e-4  # of the output's range


def image(shape, seed: int) -> np.ndarray:
    """Noisy intensities over a ramp, brighter at one side (as a microscope's uneven field is)."""
    ramp = np.linspace(0.5, 2.0, shape[1], dtype=np.float32)[None, :]
    return (np.random.default_rng(seed).gamma(2.0, 80.0, shape) * ramp).astype(np.float32)


def core_prediction(package, data: np.ndarray) -> np.ndarray:
    """bioimageio.core's prediction of a (Y, X) image, whole: (Y, X)."""
    from bioimageio.core import predict

    sample = predict(model=package, inputs={"raw": data[None, None]})
    return np.asarray(sample.members["prediction"].data.values)[0, 0]


def bioflow_prediction(package: Path, data: np.ndarray, folder: Path, tile_size=None) -> np.ndarray:
    """`bioflow predict` of a (Y, X) image written as a TIFF: (Y, X)."""
    from bioflow.prediction import predict

    folder.mkdir(parents=True, exist_ok=True)
    tif = folder / "image.tif"
    tifffile.imwrite(tif, data)
    written = predict(str(package), [str(tif)], str(folder / "out"), tile_size=tile_size, progress=False)
    (path,) = written[0].values()
    return tifffile.imread(path)


def relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / (expected.max() - expected.min()))


@pytest.fixture(scope="module")
def foreign_unet(tmp_path_factory) -> Path:
    """The package as another tool would write it: axes batch, channel, y, x with sizes 40 + 4 n,
    zero_mean_unit_variance over y and x, an output of the input's size with a halo, weights as a
    state dict with the architecture's source."""
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    folder = tmp_path_factory.mktemp("foreign_unet")
    (folder / "tiny_unet.py").write_text(textwrap.dedent(NET))
    (folder / "README.md").write_text("# tiny U-Net\n")
    namespace: dict = {}
    exec(textwrap.dedent(NET), namespace)
    torch.manual_seed(0)
    torch.save(namespace["TinyUNet"]().eval().state_dict(), folder / "weights.pt")
    x = image((64, 64), seed=0)[None, None]
    np.save(folder / "input.npy", x)
    np.save(folder / "output.npy", np.ones_like(x))  # replaced by core's prediction below
    in_id, out_id = spec.TensorId("raw"), spec.TensorId("prediction")
    size = spec.ParameterizedSize(min=40, step=4)

    def description() -> spec.ModelDescr:
        return spec.ModelDescr(
            name="tiny foreign unet",
            description="a U-Net package written without bioflow",
            authors=[spec.Author(name="Another Tool")],
            cite=[spec.CiteEntry(text="none", doi=spec.Doi("10.1234/abcd"))],
            license=spec.LicenseId("MIT"),
            documentation=spec.FileDescr(source=folder / "README.md"),
            inputs=[spec.InputTensorDescr(
                id=in_id,
                axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier("raw")]),
                      spec.SpaceInputAxis(id=spec.AxisId("y"), size=size),
                      spec.SpaceInputAxis(id=spec.AxisId("x"), size=size)],
                test_tensor=spec.FileDescr(source=folder / "input.npy"),
                preprocessing=[spec.ZeroMeanUnitVarianceDescr(
                    kwargs=spec.ZeroMeanUnitVarianceKwargs(axes=[spec.AxisId("y"), spec.AxisId("x")]))],
            )],
            outputs=[spec.OutputTensorDescr(
                id=out_id,
                axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier("p")]),
                      *[spec.SpaceOutputAxisWithHalo(id=spec.AxisId(a), halo=HALO,
                                                     size=spec.SizeReference(tensor_id=in_id, axis_id=spec.AxisId(a)))
                        for a in "yx"]],
                test_tensor=spec.FileDescr(source=folder / "output.npy"),
            )],
            weights=spec.WeightsDescr(pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                source=folder / "weights.pt", pytorch_version=spec.Version(torch.__version__.split("+")[0]),
                architecture=spec.ArchitectureFromFileDescr(
                    source=folder / "tiny_unet.py", callable=spec.Identifier("TinyUNet"), kwargs={"width": 4}),
            )),
        )

    np.save(folder / "output.npy", core_prediction(description(), x[0, 0])[None, None].astype(np.float32))
    return Path(save_bioimageio_package(description(), output_path=folder / "tiny_unet.zip"))


def test_an_image_smaller_than_a_tile_predicts_as_bioimageio_core_does(foreign_unet, tmp_path):
    """96x112 pixels, one tile: bioflow's output equals core's within 1e-4 of its range, everywhere
    (the statistics of zero_mean_unit_variance are those core takes)."""
    data = image((96, 112), seed=1)
    expected = core_prediction(str(foreign_unet), data)
    ours = bioflow_prediction(foreign_unet, data, tmp_path)
    assert ours.shape == expected.shape == data.shape
    assert relative(ours, expected) <= TOLERANCE


def test_a_tiled_image_predicts_as_bioimageio_core_does(foreign_unet, tmp_path):
    """300x280 pixels in tiles of 128 (3x3 tiles of the image padded by the halo): bioflow's output
    equals core's whole-image prediction within 1e-4 of its range."""
    data = image((300, 280), seed=2)
    expected = core_prediction(str(foreign_unet), data)
    ours = bioflow_prediction(foreign_unet, data, tmp_path, tile_size=[128])
    assert ours.shape == expected.shape == data.shape
    assert relative(ours, expected) <= TOLERANCE
