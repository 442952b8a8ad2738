"""Every registered component, built-in or installed, passes the contract of its kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from bioflow.testing import check_component


def _tiff_folders(tmp_path: Path, second: str, second_dtype) -> dict[str, Path]:
    """Two small TIFF folders paired by file name, as the file-reading data sources expect."""
    rng = np.random.default_rng(0)
    folders = {"images": tmp_path / "images", second: tmp_path / second}
    for folder in folders.values():
        folder.mkdir()
    for name in ("a.tif", "b.tif"):
        tifffile.imwrite(folders["images"] / name, rng.integers(0, 4000, (40, 48), dtype=np.uint16))
        content = np.zeros((40, 48), second_dtype)
        content[5:20, 8:30] = 3
        tifffile.imwrite(folders[second] / name, content)
    return folders


def _ome_zarr_stores(tmp_path: Path) -> dict[str, object]:
    """Two small OME-Zarr stores written by ome-zarr-py, each with a label image."""
    from tests.helpers import write_ome_zarr

    rng = np.random.default_rng(0)
    folder = tmp_path / "stores"
    folder.mkdir()
    for name in ("a", "b"):
        labels = np.zeros((40, 48), np.int32)
        labels[5:20, 8:30] = 3
        write_ome_zarr(folder / f"{name}.ome.zarr", rng.integers(0, 4000, (40, 48), dtype=np.uint16), "yx",
                       {"y": 0.5, "x": 0.5}, {"cells": labels})
    return {"images": folder, "labels": "cells"}


#: Arguments for built-in components that read the user's files: the suite writes the files.
_FILES = {
    ("sources", "bioflow:tiff_folder"): lambda tmp: _tiff_folders(tmp, "masks", np.int32),
    ("sources", "bioflow:tiff_pairs"): lambda tmp: _tiff_folders(tmp, "targets", np.float32),
    ("sources", "bioflow:ome_zarr"): _ome_zarr_stores,
}


def test_contract(bioflow_component, tmp_path):
    kind, name = bioflow_component
    make = _FILES.get((kind, name))
    check_component(kind, name, **(make(tmp_path) if make else {}))
