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
