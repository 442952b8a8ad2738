"""Reading TIFF folders: axes from metadata or declared, channel-first layout, pairing, errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from bioflow.data.sources import tiff_folder
from bioflow.data.tiff import read_tiff
from bioflow.errors import DataError


def test_plain_2d_page(tmp_path):
    data = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10)
    tifffile.imwrite(tmp_path / "a.tif", data)
    image = read_tiff(tmp_path / "a.tif", channels=True)
    assert image.array.shape == (1, 12, 10)
    assert np.array_equal(image.array[0], data)


def test_ome_axes_and_pixel_size_are_read(tmp_path):
    data = np.random.default_rng(0).integers(0, 1000, (2, 5, 12, 10)).astype(np.uint16)  # C Z Y X
    tifffile.imwrite(tmp_path / "a.ome.tif", np.moveaxis(data, 0, 1), ome=True,
                     metadata={"axes": "ZCYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 1.5})
    image = read_tiff(tmp_path / "a.ome.tif", channels=True)
    assert image.array.shape == (2, 5, 12, 10)
    assert np.array_equal(image.array, data)
    assert image.pixel_size == (1.5, 0.25, 0.25)


def test_declared_channel_last_axes(tmp_path):
    data = np.random.default_rng(1).random((12, 10, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", data)
    image = read_tiff(tmp_path / "a.tif", "YXC", channels=True)
    assert image.array.shape == (3, 12, 10)
    assert np.array_equal(image.array, np.moveaxis(data, -1, 0))


def test_undeclared_3d_is_an_error_and_wrong_axes_too(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 12, 10), np.uint8))
    with pytest.raises(DataError, match="declare them with data.source.axes"):
        read_tiff(tmp_path / "a.tif", channels=True)
    with pytest.raises(DataError, match="axes 'YX' do not fit the data of shape"):
        read_tiff(tmp_path / "a.tif", "YX", channels=True)


def test_not_a_tiff(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"hello")
    with pytest.raises(DataError, match="not a readable TIFF"):
        read_tiff(tmp_path / "a.tif", channels=True)


def test_folder_pairs_by_name_and_reports_missing_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("b", "a"):
        tifffile.imwrite(tmp_path / "images" / f"{name}.tif", np.full((8, 8), ord(name), np.uint16))
        tifffile.imwrite(tmp_path / "masks" / f"{name}.tiff", np.full((8, 8), ord(name) - 96, np.uint16))
    records = tiff_folder(tmp_path / "images", tmp_path / "masks")
    assert [r.name for r in records] == ["a", "b"]
    assert records[1].image[0, 0, 0] == ord("b") and records[1].target[0, 0] == 2
    (tmp_path / "masks" / "b.tiff").unlink()
    with pytest.raises(DataError, match=r"no mask for 1 image\(s\): b.tif"):
        tiff_folder(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(DataError, match="images folder not found"):
        tiff_folder(tmp_path / "nothing", None)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize(
    ("writer", "backend"),
    [({}, "file"), ({"compression": "zlib", "tile": (32, 32)}, "zarr"), ({"compression": "zlib"}, "zarr")],
)
def test_reader_backends_read_the_same_data(tmp_path, dtype, writer, backend):
    data = (np.random.default_rng(2).random((3, 70, 90)) * 200).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack", **writer)
    image = read_tiff(tmp_path / "a.tif", "CYX", channels=True).array
    assert image.backend == backend
    assert image.shape == (3, 70, 90) and image.dtype == dtype
    assert np.array_equal(image[:, 10:40, 5:77], data[:, 10:40, 5:77])
    assert np.array_equal(image[1, ::3, 7], data[1, ::3, 7])
    assert np.array_equal(np.asarray(image), data)


def test_compressed_without_zarr_is_read_whole(tmp_path, monkeypatch):
    import builtins

    data = np.arange(40 * 30, dtype=np.uint16).reshape(40, 30)
    tifffile.imwrite(tmp_path / "a.tif", data, compression="zlib")
    real_import = builtins.__import__

    def no_zarr(name, *args, **kwargs):
        if name == "zarr":
            raise ImportError("no zarr")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zarr)
    image = read_tiff(tmp_path / "a.tif", channels=True).array
    assert image.backend == "memory" and np.array_equal(image[0], data)


def test_big_endian_and_imagej_metadata(tmp_path):
    data = np.arange(2 * 12 * 10, dtype=">u2").reshape(2, 12, 10)
    tifffile.imwrite(tmp_path / "be.tif", data, byteorder=">", imagej=False, photometric="minisblack")
    image = read_tiff(tmp_path / "be.tif", "ZYX", channels=True).array
    assert np.array_equal(image[0], data.astype(np.uint16))
    tifffile.imwrite(tmp_path / "ij.tif", data.astype(np.uint16), imagej=True, resolution=(4.0, 4.0),
                     metadata={"axes": "ZYX", "spacing": 2.0, "unit": "micron"})
    ij = read_tiff(tmp_path / "ij.tif", channels=True)
    assert ij.array.shape == (1, 2, 12, 10) and ij.pixel_size == pytest.approx((2.0, 0.25, 0.25))


def test_lazy_images_cross_process_boundaries(tmp_path):
    import multiprocessing
    import pickle

    data = np.random.default_rng(3).integers(0, 999, (64, 64)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", data)
    image = read_tiff(tmp_path / "a.tif", channels=True).array
    _ = image[:, :4, :4]  # opened in this process
    payload = pickle.dumps(image)
    assert len(payload) < 2000  # the data does not travel, only the description
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        part = pool.apply(_read_corner, (payload,))
    assert np.array_equal(part, data[:8, :8])


def _read_corner(payload):
    import pickle

    return pickle.loads(payload)[0, :8, :8]


def test_truncated_file(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((64, 64), np.uint16))
    raw = (tmp_path / "a.tif").read_bytes()
    (tmp_path / "b.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated"):
        read_tiff(tmp_path / "b.tif", channels=True)


def test_metadata_axes_conflict_and_bad_letters(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((2, 8, 8), np.uint16), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(DataError, match="metadata says axes 'ZYX'"):
        read_tiff(tmp_path / "a.tif", "CYX", channels=True)
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(DataError, match="not an axes string"):
        tiff_folder(tmp_path / "images", None, axes="YXW")


def test_tiff_pairs_reads_targets_as_images(tmp_path):
    from bioflow.data.sources import tiff_pairs

    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    rng = np.random.default_rng(5)
    high = rng.random((2, 20, 24)).astype(np.float32)
    tifffile.imwrite(tmp_path / "low" / "a.tif", (high * 0.1).astype(np.float32), photometric="minisblack")
    tifffile.imwrite(tmp_path / "high" / "a.tif", high, photometric="minisblack")
    records = tiff_pairs(tmp_path / "low", tmp_path / "high", axes="CYX")
    assert records[0].target.shape == (2, 20, 24)
    assert np.allclose(np.asarray(records[0].target), high)
    (tmp_path / "low" / "b.tif").write_bytes((tmp_path / "low" / "a.tif").read_bytes())
    with pytest.raises(DataError, match=r"no target for 1 image\(s\): b.tif"):
        tiff_pairs(tmp_path / "low", tmp_path / "high", axes="CYX")
