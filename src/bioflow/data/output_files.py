"""The writer of each output of ``bioflow predict``, by format, and what it records of its origin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bioflow.data.writers import TiffWriter


def zarr_layout(f: Path, first) -> tuple[tuple[int, ...] | None, str]:
    """The spatial chunks and the NGFF version of an OME-Zarr input (None and 0.5 for a TIFF), which
    its OME-Zarr outputs keep."""
    from bioflow.data.omezarr import LazyZarr, is_zarr, open_multiscale

    if not is_zarr(f) or not isinstance(first.array, LazyZarr):
        return None, "0.5"
    import zarr

    source = first.array
    chunks = zarr.open_array(str(source.path), mode="r").chunks
    spatial = sorted((pos, c) for pos, c in zip(source.take, chunks) if pos is not None and pos >= 1)
    version = open_multiscale(f).version
    return tuple(c for _, c in spatial), "0.4" if version == "0.4" else "0.5"


def make_writer(target: Path, shape, spec: Any, f: Path, first, frames: int, provenance: dict[str, Any],
                 resume: bool = False, create: bool = True):
    """The writer of one output: OME-Zarr by the target's name, else OME-TIFF."""
    if target.name.endswith(".ome.zarr"):
        from bioflow.data.omezarr import ZarrWriter

        chunks, version = zarr_layout(f, first)
        label = spec.channels is None and np.issubdtype(np.dtype(spec.dtype), np.integer)
        return ZarrWriter(target, shape, spec, first.file_axes, first.pixel_size, frames, spatial_chunks=chunks,
                          version=version, label=label, resume=resume, create=create,
                          attributes={"bioflow": provenance})
    return TiffWriter(target, shape, spec, first.file_axes, first.pixel_size, frames)


def provenance(f: Path, model: str, model_run_id: str | None, record_id: str | None) -> dict[str, Any]:
    from bioflow.version import __version__

    return {"source": str(f.resolve()), "model": model, "model_run_id": model_run_id, "prediction_run_id": record_id,
            "bioflow_version": __version__}
