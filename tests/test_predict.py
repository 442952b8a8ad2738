"""`bioflow predict`: outputs, metadata, agreement with in-memory prediction, bad inputs, memory."""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from bioflow.checkpoint import load_checkpoint
from bioflow.errors import BioflowError
from bioflow.loading import task_from_checkpoint
from bioflow.data.normalize import PercentileNorm
from bioflow.testing import make_checkpoint
from tests.helpers import run_cli

SMALL_UNET = ("model.depth=2", "model.base_channels=4")


@pytest.fixture(scope="module")
def model2d(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "m.ckpt", *SMALL_UNET, pixel_size=[0.5, 0.5])


def image(shape, seed=0, dtype=np.uint16):
    return (np.random.default_rng(seed).gamma(2.0, 200.0, shape)).astype(dtype)


def reference_labels(model: Path, data: np.ndarray) -> np.ndarray:
    """In-memory prediction of the same model: normalise, predict the whole image, argmax."""
    task = task_from_checkpoint(load_checkpoint(model), "model")
    x = torch.from_numpy(PercentileNorm.fit(data[None])(data[None]))
    with torch.no_grad():
        return task.predict_image(x).argmax(0).numpy()


def test_folder_in_outputs_out_with_axes_and_pixel_size(model2d, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    data = image((300, 260))
    tifffile.imwrite(inputs / "a.ome.tif", data, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    tifffile.imwrite(inputs / "b.tif", image((64, 80), 1))
    result = run_cli("predict", str(model2d), str(inputs), "--out", str(tmp_path / "out"), "--tile-size", "96", "--no-progress")
    assert result.returncode == 0, result.stderr
    with tifffile.TiffFile(tmp_path / "out" / "a.tif") as tif:
        labels = tif.asarray()
        assert tif.is_ome and tif.series[0].axes == "YX"
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
    assert labels.shape == (300, 260) and labels.dtype == np.uint8
    agreement = (labels == reference_labels(model2d, data)).mean()
    assert agreement > 0.999  # tiles of 96 blended versus one automatic tile: same up to float ties
    assert tifffile.imread(tmp_path / "out" / "b.tif").shape == (64, 80)
    assert not list((tmp_path / "out").glob(".*partial"))


def test_channels_and_3d_keep_the_input_axes(tmp_path):
    model = make_checkpoint(tmp_path / "m2.ckpt", "model.depth=1", "model.base_channels=2", in_channels=2)
    data = np.stack([image((40, 50), 0), image((40, 50), 1)], axis=-1)  # Y X C
    tifffile.imwrite(tmp_path / "yxc.tif", data)
    ok = run_cli("predict", str(model), str(tmp_path / "yxc.tif"), "--axes", "YXC", "--out", str(tmp_path / "o"), "--no-progress")
    assert ok.returncode == 0, ok.stderr
    with tifffile.TiffFile(tmp_path / "o" / "yxc.tif") as tif:
        assert tif.series[0].axes == "YX" and tif.series[0].shape == (40, 50)
    model3 = make_checkpoint(tmp_path / "m3.ckpt", "model.depth=1", "model.base_channels=2", spatial_dims=3)
    tifffile.imwrite(tmp_path / "v.tif", image((10, 30, 20)), imagej=True, metadata={"axes": "ZYX"})
    ok3 = run_cli("predict", str(model3), str(tmp_path / "v.tif"), "--out", str(tmp_path / "o3"), "--no-progress")
    assert ok3.returncode == 0, ok3.stderr
    with tifffile.TiffFile(tmp_path / "o3" / "v.tif") as tif:
        assert tif.series[0].axes == "ZYX" and tif.series[0].shape == (10, 30, 20)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not ln.startswith("bioflow: note")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_bad_inputs_give_one_line_errors_and_no_output(model2d, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "text.tif").write_text("not a tiff")
    assert "not a readable TIFF" in one_line_error(run_cli("predict", str(model2d), str(tmp_path / "text.tif"), "--out", str(out)))
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, image((128, 128)))
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(good.read_bytes()[:-5000])
    assert "truncated" in one_line_error(run_cli("predict", str(model2d), str(truncated), "--out", str(out)))
    tifffile.imwrite(tmp_path / "rgb.tif", image((3, 32, 32)), imagej=True, metadata={"axes": "CYX"})
    assert "3 channel(s) but the model expects 1" in one_line_error(
        run_cli("predict", str(model2d), str(tmp_path / "rgb.tif"), "--out", str(out)))
    assert "axes 'ZYX' do not fit" in one_line_error(
        run_cli("predict", str(model2d), str(good), "--axes", "ZYX", "--out", str(out)))
    nan = image((32, 32)).astype(np.float32)
    nan[3, 4] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    assert "NaN" in one_line_error(run_cli("predict", str(model2d), str(tmp_path / "nan.tif"), "--out", str(out)))
    assert "would overwrite the input" in one_line_error(run_cli("predict", str(model2d), str(good), "--out", str(tmp_path)))
    assert "no such file" in one_line_error(run_cli("predict", str(model2d), str(tmp_path / "missing.tif"), "--out", str(out)))
    assert not out.exists() or not any(out.iterdir())


def test_existing_outputs_are_kept_unless_overwrite(model2d, tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", image((32, 32)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.tif").write_bytes(b"precious")
    assert "exists already" in one_line_error(run_cli("predict", str(model2d), str(tmp_path / "a.tif"), "--out", str(out)))
    assert (out / "a.tif").read_bytes() == b"precious"
    ok = run_cli("predict", str(model2d), str(tmp_path / "a.tif"), "--out", str(out), "--overwrite", "--no-progress")
    assert ok.returncode == 0 and tifffile.imread(out / "a.tif").shape == (32, 32)


def test_failure_midway_leaves_no_partial_or_final_file(model2d, tmp_path):
    """A compressed file whose data is corrupt after the first strips fails while predicting."""
    data = image((512, 512))
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, data, compression="zlib", tile=(64, 64))
    with tifffile.TiffFile(path) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    raw = bytearray(path.read_bytes())
    last = len(offsets) - 1  # corrupt the last tile: the error comes after output has been written
    raw[offsets[last]:offsets[last] + counts[last]] = zlib.compress(b"\0" * 10)[: counts[last]].ljust(counts[last], b"\1")
    path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    error = one_line_error(run_cli("predict", str(model2d), str(path), "--out", str(out), "--tile-size", "128"))
    assert "corrupt.tif" in error
    assert not out.exists() or not any(out.iterdir())


def test_pixel_size_mismatch_warns_and_rescale_keeps_the_shape(model2d, tmp_path):
    data = image((120, 100))
    tifffile.imwrite(tmp_path / "a.tif", data, ome=True, metadata={"axes": "YX", "PhysicalSizeX": 1.0, "PhysicalSizeY": 1.0})
    plain = run_cli("predict", str(model2d), str(tmp_path / "a.tif"), "--out", str(tmp_path / "o1"), "--no-progress")
    assert plain.returncode == 0 and "differs from the training pixel size 0.5x0.5" in plain.stderr
    scaled = run_cli("predict", str(model2d), str(tmp_path / "a.tif"), "--out", str(tmp_path / "o2"), "--rescale", "--no-progress")
    assert scaled.returncode == 0, scaled.stderr
    assert tifffile.imread(tmp_path / "o2" / "a.tif").shape == (120, 100)


PEAK = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(args: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def test_memory_depends_on_the_tile_not_on_the_image(tmp_path):
    """Peak RSS of predicting an 8192x8192 uint16 image versus a 1024x1024 one, same tiles."""
    from tests.helpers import BIOFLOW

    model = make_checkpoint(tmp_path / "tiny.ckpt", "model.depth=1", "model.base_channels=2")
    rng = np.random.default_rng(0)
    for name, size in (("small", 1024), ("large", 8192)):
        tifffile.imwrite(tmp_path / f"{name}.tif", rng.integers(0, 4000, (size, size), dtype=np.uint16))
    common = ["--tile-size", "256", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    small = peak_rss_mib([BIOFLOW, "predict", str(model), str(tmp_path / "small.tif"), "--out", str(tmp_path / "o1"), *common])
    large = peak_rss_mib([BIOFLOW, "predict", str(model), str(tmp_path / "large.tif"), "--out", str(tmp_path / "o2"), *common])
    whole_float = 8192 * 8192 * 4 / 2**20  # 256 MiB: one float32 copy of the large image
    print(f"peak RSS: 1024^2 {small:.0f} MiB, 8192^2 {large:.0f} MiB")
    assert large - small < 0.5 * whole_float
    assert tifffile.imread(tmp_path / "o2" / "large.tif").shape == (8192, 8192)


def test_postprocessor_writes_instances_next_to_the_class_map(tmp_path):
    model = make_checkpoint(tmp_path / "m.ckpt", "model.depth=1", "model.base_channels=2",
                            "postprocessor=connected_components", "postprocessor.min_size=0")
    tifffile.imwrite(tmp_path / "a.tif", image((50, 40)))
    result = run_cli("predict", str(model), str(tmp_path / "a.tif"), "--out", str(tmp_path / "o"), "--no-progress")
    assert result.returncode == 0, result.stderr
    labels = tifffile.imread(tmp_path / "o" / "a.tif")
    instances = tifffile.imread(tmp_path / "o" / "a_instances.tif")
    assert instances.dtype == np.int32 and instances.shape == labels.shape
    # instances are the connected components of the predicted foreground (argmax = threshold 0.5 for 2 classes)
    from scipy import ndimage

    expected, n = ndimage.label(labels > 0)
    assert instances.max() == n
    assert np.array_equal(instances > 0, labels > 0)
    assert not list((tmp_path / "o").glob(".bioflow-*"))  # the spooled probabilities are gone


def test_a_model_saved_before_the_renames_still_loads_and_predicts(tmp_path, model2d):
    """Checkpoints written before the registry kinds were renamed (``architectures``, ``datasets``),
    before tasks were components and before the network was called ``model`` (``net.`` keys)."""
    new = load_checkpoint(model2d)
    old = dict(new)
    old["state_dict"] = {("net." + k[6:] if k.startswith("model.") else k): v for k, v in new["state_dict"].items()}
    assert any(k.startswith("net.") for k in old["state_dict"])
    renamed = {"models": "architectures", "sources": "datasets"}
    old["bioflow"] = {**new["bioflow"], "components": {
        path: {**comp, "kind": renamed.get(comp["kind"], comp["kind"])}
        for path, comp in new["bioflow"]["components"].items() if comp["kind"] != "tasks"}}
    assert {c["kind"] for c in old["bioflow"]["components"].values()} >= {"architectures"}
    torch.save(old, tmp_path / "old.ckpt")
    data = image((40, 40), seed=3)
    tifffile.imwrite(tmp_path / "a.tif", data)
    for name in ("old", "new"):
        source = tmp_path / "old.ckpt" if name == "old" else model2d
        done = run_cli("predict", str(source), str(tmp_path / "a.tif"), "--out", str(tmp_path / name), "--no-progress")
        assert done.returncode == 0, done.stderr
    assert np.array_equal(tifffile.imread(tmp_path / "old" / "a.tif"), tifffile.imread(tmp_path / "new" / "a.tif"))
    assert np.array_equal(tifffile.imread(tmp_path / "old" / "a.tif"), reference_labels(model2d, data))


def test_precision_bf16_predicts_through_bfloat16_and_close_to_float32(model2d, tmp_path, monkeypatch):
    from bioflow.prediction import predict

    data = image((96, 96))
    tifffile.imwrite(tmp_path / "a.tif", data)
    seen = []
    original = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x: seen.append(original(self, x).dtype) or original(self, x))
    outs = {}
    for precision in ("32-true", "bf16-mixed"):
        seen.clear()
        predict(str(model2d), [str(tmp_path / "a.tif")], str(tmp_path / precision), precision=precision, tile_size=[96],
                progress=False)
        assert set(seen) == {torch.float32 if precision == "32-true" else torch.bfloat16}
        outs[precision] = tifffile.imread(tmp_path / precision / "a.tif")
    assert (outs["32-true"] == outs["bf16-mixed"]).mean() > 0.98
    with pytest.raises(BioflowError, match="--precision"):
        predict(str(model2d), [str(tmp_path / "a.tif")], str(tmp_path / "x"), precision="fp8", progress=False)


def test_a_confidence_map_on_request_is_the_probability_of_each_pixels_class(tmp_path):
    """--confidence (and confidence=True from Python): the softmax probability of the chosen class."""
    import bioflow
    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
    from bioflow.testing import make_checkpoint
    from tests.helpers import run_cli

    path = make_checkpoint(tmp_path / "m.ckpt", "experiment=demo_unet", "model.depth=1", "model.base_channels=4",
                           "task.target=classes", "task.num_classes=3", "task.class_names=null", seed=1)
    image = (synthetic_nuclei_image((64, 48), seed=2)[0] * 1000).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", image)
    result = run_cli("predict", str(path), str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"), "--confidence",
                     "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    confidence = tifffile.imread(tmp_path / "out" / "a_confidence.tif")
    assert confidence.shape == image.shape and confidence.dtype == np.float32
    assert confidence.min() >= 1 / 3 - 1e-6 and confidence.max() <= 1 + 1e-6
    model = bioflow.load_model(str(path))
    with_map = model.predict(image, confidence=True)
    np.testing.assert_allclose(with_map["confidence"], confidence, atol=1e-5)
    assert np.array_equal(with_map["labels"], tifffile.imread(tmp_path / "out" / "a.tif"))
    assert "confidence" not in model.predict(image)  # only on request
    plain = run_cli("predict", str(path), str(tmp_path / "a.tif"), "--out", str(tmp_path / "plain"), "--no-progress")
    assert plain.returncode == 0 and not (tmp_path / "plain" / "a_confidence.tif").exists()
