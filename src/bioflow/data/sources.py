"""Built-in data sources (registry kind ``sources``): callables that return image records."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np

from bioflow.data.records import ImageRecord
from bioflow.data.tiff import TIFF_SUFFIXES, file_stem, read_tiff_frames
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


def _tiff_files(folder: Path, what: str) -> dict[str, Path]:
    """The TIFF files of a folder (or the one file given) by stem."""
    if folder.is_file():
        if not folder.name.lower().endswith(TIFF_SUFFIXES):
            raise DataError(f"{folder}: not a .tif/.tiff file; give a TIFF file or a folder of them")
        return {file_stem(folder): folder}
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES))
    if not files:
        raise DataError(f"{folder}: no .tif/.tiff files in the {what} folder")
    return _by_stem(files, file_stem)


def _by_stem(paths: Sequence[Path], stem) -> dict[str, Path]:
    """Paths by their name without extension (``stem``); two of one name are an error."""
    by_stem: dict[str, Path] = {}
    for p in paths:
        if stem(p) in by_stem:
            raise DataError(f"{p}: same name as {by_stem[stem(p)]}; names must be unique in a folder")
        by_stem[stem(p)] = p
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
        Folder of ``.tif``/``.tiff`` images (OME-TIFF included), or one such file. A time-lapse
        (T axis) gives one image per time point, all in the same split.
    masks
        Folder of label masks, one per image, with the same file name (``a.tif`` pairs with
        ``a.tif`` or ``a.tiff``), or one file. Leave out for tasks without masks.
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
        frames = read_tiff_frames(path, axes, channels=True)
        targets: list[Any] = [None] * len(frames)
        if masks is not None:
            spatial_axes = "".join(a for a in frames[0].file_axes.upper() if a in "TZYX")
            mask_frames = read_tiff_frames(mask_files[stem], mask_axes or spatial_axes, channels=False)
            _check_frames(mask_files[stem], len(mask_frames), path, len(frames))
            targets = [_integer_labels(m.array, mask_files[stem]) for m in mask_frames]
        records += _frame_records(stem, path, frames, targets, pixel_size, mask_files.get(stem))
    return records


def _check_frames(target_path: Path, n_target: int, path: Path, n_image: int) -> None:
    if n_target != n_image:
        raise DataError(f"{target_path}: {n_target} time point(s), but its image {path.name} has {n_image}")


def _integer_labels(target, path: Path):
    if np.issubdtype(target.dtype, np.integer):
        return target
    values = np.asarray(target)
    if not np.all(np.isfinite(values)) or np.any(np.mod(values, 1)):
        raise DataError(f"{path}: mask values must be integer labels, found {target.dtype} fractions")
    return values.astype(np.int32)


def _frame_records(stem: str, path: Path, frames, targets, pixel_size, target_path: Path | None = None) -> list[ImageRecord]:
    """One record per time point; the frames of a file stay in one split (one group)."""
    out = []
    for image, target in zip(frames, targets):
        size = tuple(pixel_size) if pixel_size is not None else image.pixel_size
        name = stem if image.frames == 1 else f"{stem}_t{image.frame:04d}"
        meta = {"channel_names": image.channel_names} if image.channel_names else {}
        if target_path is not None:
            meta["target_source"] = str(target_path)
        out.append(ImageRecord(name=name, image=image.array, target=target, pixel_size=size, source=str(path),
                               group=stem if image.frames > 1 else None, meta=meta))
    return out


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
        frames = read_tiff_frames(path, axes, channels=True)
        target_frames = read_tiff_frames(target_files[stem], target_axes or frames[0].file_axes, channels=True)
        _check_frames(target_files[stem], len(target_frames), path, len(frames))
        records += _frame_records(stem, path, frames, [t.array for t in target_frames], pixel_size, target_files[stem])
    return records


def _zarr_stores(where: Path, what: str) -> dict[str, Path]:
    """The OME-Zarr stores of a folder (or the one store given) by name."""
    from bioflow.data.omezarr import is_zarr, zarr_stem

    where = Path(where)
    if is_zarr(where):
        return {zarr_stem(where): where}
    if not where.is_dir():
        raise DataError(f"{where}: {what} store or folder not found")
    stores = sorted(p for p in where.iterdir() if not p.name.startswith(".") and is_zarr(p))
    if not stores:
        raise DataError(f"{where}: no OME-Zarr stores in the {what} folder (and it is not a store itself)")
    return _by_stem(stores, zarr_stem)


def ome_zarr(
    images: Path,
    labels: Optional[str] = None,
    targets: Optional[Path] = None,
    level: int = 0,
    axes: Optional[str] = None,
    pixel_size: Optional[list[float]] = None,
) -> list[ImageRecord]:
    """Images from OME-Zarr stores (NGFF 0.4 or 0.5), read lazily chunk by chunk.

    Parameters
    ----------
    images
        One OME-Zarr store, or a folder of them.
    labels
        The label image (under each store's ``labels/`` group) that holds the masks: its name, or
        ``auto`` for a store's only one. Leave out for tasks without masks.
    targets
        For restoration: a store or folder of stores with the target images, paired by name.
    level
        The resolution level to train on (0: full resolution); masks come from the label level of
        the same pixel size.
    axes
        Axes of the stores, only to check them: the stores' metadata says what they are.
    pixel_size
        Pixel size per spatial axis, instead of the stores' scales.
    """
    from bioflow.data.omezarr import label_image, matching_level, open_multiscale, read_zarr_frames

    _check_axes(axes=axes)
    if labels is not None and targets is not None:
        raise DataError("data.source: give labels (segmentation masks) or targets (restoration pairs), not both")
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise DataError(f"data.source.level: {level!r} is not a resolution level (0, 1, ...)")
    stores = _zarr_stores(Path(images), "images")
    target_stores: dict[str, Path] = {}
    if targets is not None:
        target_stores = _zarr_stores(Path(targets), "targets")
        missing = [p.name for s, p in stores.items() if s not in target_stores]
        if missing:
            raise DataError(f"{targets}: no target for {len(missing)} image(s): {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}")
    records = []
    for stem, path in stores.items():
        image = open_multiscale(path)
        frames = read_zarr_frames(path, axes, channels=True, level=level, multiscale=image)
        found: list[Any] = [None] * len(frames)
        target_path = None
        if labels is not None:
            mask = label_image(image, None if labels == "auto" else labels)
            mask_frames = read_zarr_frames(mask.path, channels=False, level=matching_level(image, level, mask),
                                           multiscale=mask)
            _check_frames(mask.path, len(mask_frames), path, len(frames))
            found = [_integer_labels(m.array, mask.path) for m in mask_frames]
            target_path = mask.path
        elif targets is not None:
            target_path = target_stores[stem]
            target_frames = read_zarr_frames(target_path, channels=True, level=level)
            _check_frames(target_path, len(target_frames), path, len(frames))
            found = [t.array for t in target_frames]
        for frame, target in zip(frames, found):
            if target is not None and tuple(target.shape[-len(frame.array.shape[1:]):]) != tuple(frame.array.shape[1:]):
                raise DataError(f"{target_path}: shape {tuple(target.shape)} does not fit its image "
                                f"{path} (spatial shape {tuple(frame.array.shape[1:])})")
        records += _frame_records(stem, path, frames, found, pixel_size, target_path)
    return records
