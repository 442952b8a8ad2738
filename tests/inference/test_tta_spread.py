"""--tta-spread: how much the predictions of the flipped and turned image disagree, for any model."""

from __future__ import annotations

import numpy as np
import tifffile
import torch

from bioflow.inference.tiling import _apply_tta, _dihedral


def test_the_spread_is_the_std_over_the_transforms_and_zero_for_a_pixelwise_model():
    batch = torch.rand(2, 1, 8, 8)
    pixelwise = _apply_tta(lambda x: 3 * x + 1, batch, None, spread=lambda y: y)
    assert torch.allclose(pixelwise[:, :1], 3 * batch + 1, atol=1e-6)
    assert float(pixelwise[:, 1].abs().max()) < 1e-5

    ramp = torch.arange(8.0).expand(8, 8)  # adds the column index: its turned and flipped versions differ

    def biased(x):
        return x + ramp

    out = _apply_tta(biased, batch, None, spread=lambda y: y)
    by_hand = []
    for k, flip in _dihedral(2, (8, 8)):  # each augmented prediction, undone
        x = torch.rot90(torch.flip(batch, (3,)) if flip else batch, k, (2, 3))
        y = torch.rot90(biased(x), -k, (2, 3))
        by_hand.append(torch.flip(y, (3,)) if flip else y)
    stack = torch.stack(by_hand)
    assert torch.allclose(out[:, :1], stack.mean(0), atol=1e-5)
    assert torch.allclose(out[:, 1:], stack.std(0, unbiased=False), atol=1e-5)
    assert float(out[:, 1].max()) > 1  # the ramp's disagreement shows


def test_predict_writes_the_spread_beside_the_outputs_at_the_image_size_for_a_grid_model(tmp_path):
    """StarDist predicts on a grid: the spread comes back at the image's size and pixel size; the
    labels are those of --tta alone; from Python the same map."""
    import bioflow
    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
    from bioflow.testing import make_checkpoint
    from tests.helpers import run_cli

    path = make_checkpoint(tmp_path / "m.ckpt", "experiment=demo_stardist", "model.depth=1", "model.base_channels=4",
                           pixel_size=[0.5, 0.5], seed=1)
    image = (synthetic_nuclei_image((61, 47), seed=2)[0] * 1000).astype(np.float32)  # odd sizes, grid 2
    tifffile.imwrite(tmp_path / "a.ome.tif", image, ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    spread = run_cli("predict", str(path), str(tmp_path / "a.ome.tif"), "--out", str(tmp_path / "s"), "--tta-spread",
                     "--no-progress")
    assert spread.returncode == 0, spread.stderr[-2000:]
    plain = run_cli("predict", str(path), str(tmp_path / "a.ome.tif"), "--out", str(tmp_path / "t"), "--tta", "--no-progress")
    assert plain.returncode == 0, plain.stderr[-2000:]
    with tifffile.TiffFile(tmp_path / "s" / "a_tta_spread.tif") as tif:
        written = tif.asarray()
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
    assert written.shape == image.shape and written.dtype == np.float32
    assert np.isfinite(written).all() and written.min() >= 0 and 0 <= written.max() <= 0.5  # a std of probabilities
    assert np.array_equal(tifffile.imread(tmp_path / "s" / "a.tif"), tifffile.imread(tmp_path / "t" / "a.tif"))
    assert not (tmp_path / "t" / "a_tta_spread.tif").exists()
    model = bioflow.load_model(str(path))
    np.testing.assert_allclose(model.predict(image, tta_spread=True)["tta_spread"], written, atol=1e-6)
    even = written[:60, :46]  # each grid cell's value covers its 2x2 pixels
    assert np.array_equal(even[0::2, 0::2], even[1::2, 1::2])
    assert np.array_equal(written[:60:2, 46], written[1:60:2, 46])


def test_restoration_spread_is_in_the_images_intensity_units():
    """A restoration model's spread scales with the image's intensities (per-image normalisation)."""
    from bioflow.prediction import predict_array
    from tests.helpers import task_and_data

    task, data = task_and_data("experiment=demo_care", "data.source.n_images=4", "data.source.shape=[48,48]",
                          "data.patch_size=[32,32]", "model.base_channels=4", "model.depth=1")
    task.eval()
    image = np.asarray(data.splits["train"][0].image, dtype=np.float32)
    once = predict_array(task, image, tta_spread=True)
    tenfold = predict_array(task, image * 10, tta_spread=True)
    assert once["tta_spread"].max() > 0
    np.testing.assert_allclose(tenfold["tta_spread"], 10 * once["tta_spread"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(tenfold["restored"], 10 * once["restored"], rtol=1e-3, atol=1e-3)


def test_a_grid_coarser_along_one_axis_only_is_brought_to_the_image_size():
    from bioflow.inference.outputs import OutputSpec
    from bioflow.prediction import ArrayWriter, _write_spread

    writer = ArrayWriter((10, 4), OutputSpec("tta_spread", None, np.float32))
    block = torch.arange(20.0).reshape(5, 4)  # 5 grid rows of 2 image rows each
    _write_spread(writer, 0, block, (2, 1), frame=0)
    assert np.array_equal(writer.array, np.repeat(block.numpy(), 2, axis=0))
