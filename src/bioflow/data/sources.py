"""Built-in data sources (registry kind ``datasets``): callables that return image records."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from bioflow.data.records import ImageRecord
from bioflow.data.tiff import TIFF_SUFFIXES, read_tiff
from bioflow.errors import DataError


def synthetic_nuclei(
    n_images: int = 24,
    shape: Sequence[int] = (256, 256),
    seed: int = 0,
    radius: Sequence[float] = (6.0, 12.0),
    overlap: float = 0.25,
    clustering: float = 0.5,
    anisotropy: float = 1.0,
    rare_fraction: float = 0.0,
) -> list[ImageRecord]:
    """Generated fluorescence images of nuclei with instance labels (2D or 3D by ``shape``).

    The demo data of bioflow: deterministic from ``seed``, nothing is downloaded. See
    :func:`bioflow.data.synthetic_nuclei.synthetic_nuclei_image` for what the images contain.
    With ``rare_fraction`` > 0 some nuclei are of a rare, distinct kind and the targets are class
    masks instead: 0 background, 1 nucleus, 2 rare nucleus (use ``task.target=classes
    task.num_classes=3``) — data for studying class imbalance.
    """
    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image

    records = []
    for i in range(n_images):
        generated = synthetic_nuclei_image(
            tuple(shape), seed=seed, index=i, radius=tuple(radius), overlap=overlap,
            clustering=clustering, anisotropy=anisotropy, rare_fraction=rare_fraction,
        )
        image, labels = generated[0], generated[1]
        if rare_fraction > 0:
            labels = np.where(np.isin(labels, generated[2]), 2, (labels > 0).astype(np.int32)).astype(np.int32)
        pixel_size = (anisotropy, 1.0, 1.0) if len(shape) == 3 else (1.0, 1.0)
        records.append(
            ImageRecord(
                name=f"nuclei_{i:04d}", image=image[None], target=labels, pixel_size=pixel_size,
                source=f"synthetic_nuclei(seed={seed}, index={i})",
            )
        )
    return records


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _tiff_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES))
    if not files:
        raise DataError(f"{folder}: no .tif/.tiff files in the {what} folder")
    by_stem: dict[str, Path] = {}
    for p in files:
        if _stem(p) in by_stem:
            raise DataError(f"{p}: same name as {by_stem[_stem(p)]}; names must be unique in a folder")
        by_stem[_stem(p)] = p
    return by_stem


_AXIS_LETTERS = set("TCZYXS")


def _check_axes(**declared: Optional[str]) -> None:
    for key, value in declared.items():
        if value is not None and (not value or set(value.upper()) - _AXIS_LETTERS):
            raise DataError(f"data.source.{key}: '{value}' is not an axes string (letters from T, C, Z, Y, X, S)")


def _paired_files(first: Path, second: Optional[Path], what: str, one: str) -> tuple[dict[str, Path], dict[str, Path]]:
    """TIFF files of ``first`` and their partners of the same name in ``second`` (all must have one)."""
    first_files = _tiff_files(Path(first), "images")
    if second is None:
        return first_files, {}
    second_files = _tiff_files(Path(second), what)
    missing = [first_files[s].name for s in first_files if s not in second_files]
    if missing:
        raise DataError(
            f"{second}: no {one} for {len(missing)} image(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return first_files, second_files


def tiff_folder(
    images: Path,
    masks: Optional[Path] = None,
    axes: Optional[str] = None,
    mask_axes: Optional[str] = None,
    pixel_size: Optional[list[float]] = None,
) -> list[ImageRecord]:
    """Images from a folder of TIFF files, with masks from a second folder paired by file name.

    Parameters
    ----------
    images
        Folder of ``.tif``/``.tiff`` images (OME-TIFF included).
    masks
        Folder of label masks, one per image, with the same file name (``a.tif`` pairs with
        ``a.tif`` or ``a.tiff``). Leave out for tasks without masks.
    axes
        Axes of the image files when their metadata does not say (e.g. ``ZYX``, ``CYX``, ``YXC``).
    mask_axes
        Axes of the mask files when their metadata does not say (default: the image's spatial axes).
    pixel_size
        Pixel size per spatial axis when the files do not record it.
    """
    _check_axes(axes=axes, mask_axes=mask_axes)
    image_files, mask_files = _paired_files(images, masks, "masks", "mask")
    records = []
    for stem, path in image_files.items():
        image = read_tiff(path, axes, channels=True)
        target = None
        if masks is not None:
            spatial_axes = "".join(a for a in image.file_axes.upper() if a in "ZYX")
            target = read_tiff(mask_files[stem], mask_axes or spatial_axes, channels=False).array
            if not np.issubdtype(target.dtype, np.integer):
                if not np.all(np.isfinite(target)) or np.any(np.mod(target, 1)):
                    raise DataError(f"{mask_files[stem]}: mask values must be integer labels, found {target.dtype} fractions")
                target = target.astype(np.int32)
        size = tuple(pixel_size) if pixel_size is not None else image.pixel_size
        records.append(ImageRecord(name=stem, image=image.array, target=target, pixel_size=size, source=str(path)))
    return records


def synthetic_restoration(
    n_images: int = 8,
    shape: Sequence[int] = (256, 256),
    seed: int = 0,
    noise: str = "gaussian",
    sigma: float = 25.0,
    photons: float = 30.0,
    blur: float = 0.0,
    peak: float = 255.0,
    structures: Literal["mixed", "blobs", "filaments"] = "mixed",
    with_targets: bool = True,
) -> list[ImageRecord]:
    """Generated degraded images with their clean versions as targets (see
    :mod:`bioflow.data.synthetic_restoration`). ``with_targets=False`` leaves the targets out, as
    for real Noise2Void data that has no clean version."""
    from bioflow.data.synthetic_restoration import synthetic_restoration_pair

    records = []
    for i in range(n_images):
        degraded, clean = synthetic_restoration_pair(
            tuple(shape), seed=seed, index=i, noise=noise, sigma=sigma, photons=photons, blur=blur, peak=peak,
            structures=structures,
        )
        records.append(ImageRecord(
            name=f"restoration_{i:04d}", image=degraded[None], target=clean[None] if with_targets else None,
            source=f"synthetic_restoration(seed={seed}, index={i}, noise={noise})",
        ))
    return records


def tiff_pairs(
    images: Path,
    targets: Path,
    axes: Optional[str] = None,
    target_axes: Optional[str] = None,
    pixel_size: Optional[list[float]] = None,
) -> list[ImageRecord]:
    """Pairs of TIFF images for restoration: degraded ``images`` and good ``targets`` of the same name.

    Targets are images (any number type, channels like the inputs), not labels. For Noise2Void the
    targets are clean versions used for evaluation only.
    """
    _check_axes(axes=axes, target_axes=target_axes)
    image_files, target_files = _paired_files(images, targets, "targets", "target")
    records = []
    for stem, path in image_files.items():
        image = read_tiff(path, axes, channels=True)
        target = read_tiff(target_files[stem], target_axes or image.file_axes, channels=True)
        size = tuple(pixel_size) if pixel_size is not None else image.pixel_size
        records.append(ImageRecord(name=stem, image=image.array, target=target.array, pixel_size=size, source=str(path)))
    return records
