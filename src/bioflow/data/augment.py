"""Albumentations augmentation, applied after normalisation and safe for label images.

Arrays inside bioflow are channel-first; albumentations expects channel-last and silently misreads
a channel-first array, so the conversion happens here, explicitly, and nowhere else. Label masks
are passed as int32 (albumentations keeps integer labels intact with nearest interpolation, even
above 65535). Each call is seeded, so a sample is reproducible whatever the worker layout.

The pipeline is configured as a mapping from albumentations transform names to their arguments,
e.g. ``{HorizontalFlip: {p: 0.5}, RandomRotate90: {p: 0.5}}``, applied in that order. A transform
set to ``null`` is switched off (an experiment can drop a transform its base config lists); ``{}``
uses the transform's default arguments.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping

import numpy as np

from bioflow.arguments import check_arguments
from bioflow.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

#: How a task uses targets: label masks, restoration images, none at all, or images used only to
#: evaluate (self-supervised training, e.g. Noise2Void with clean images for validation).
TargetKind = Literal["mask", "image", "none", "optional_image"]


def build_pipeline(spec: Mapping[str, Mapping[str, Any] | None], where: str = "data.augment"):
    """An ``albumentations.Compose`` from ``{TransformName: kwargs}``; ``None`` if ``spec`` is empty."""
    import albumentations as A

    transforms = []
    for name, kwargs in (spec or {}).items():
        if kwargs is None:
            continue
        cls = getattr(A, name, None)
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            known = [n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)]
            raise ConfigError(f"{where}.{name}: unknown albumentations transform '{name}'{did_you_mean(name, known, n=3)}")
        kwargs = dict(kwargs)
        check_arguments(cls, kwargs, where=f"{where}.{name}", label=f"transform '{name}'")
        if issubclass(cls, A.ImageOnlyTransform):
            log.warning(
                "%s.%s changes intensities; albumentations clips float images to [0, 1], so normalised "
                "values outside that range are lost", where, name,
            )
        try:
            transforms.append(cls(**kwargs))
        except Exception as exc:  # albumentations validates its arguments itself
            raise ConfigError(f"{where}.{name}: {' '.join(str(exc).split())}") from exc
    return A.Compose(transforms) if transforms else None


class Augmenter:
    """Applies one albumentations pipeline to channel-first image/target pairs.

    Parameters
    ----------
    spec
        ``{TransformName: kwargs}`` as in the config.
    spatial_dims
        2 or 3. Volumes go through albumentations' 3D targets (``volume``/``mask3d``).
    target_kind
        ``mask`` for label images (geometric transforms only, nearest interpolation), ``image`` for
        restoration targets (transformed geometrically exactly like the input), ``none``.
    """

    def __init__(self, spec: Mapping[str, Any] | None, spatial_dims: int, target_kind: TargetKind = "mask") -> None:
        self.pipeline = build_pipeline(spec)
        self.spatial_dims = spatial_dims
        self.target_kind = target_kind
        if self.pipeline is not None and target_kind == "image":
            import albumentations as A

            for t in self.pipeline.transforms:
                if isinstance(t, A.ImageOnlyTransform):
                    raise ConfigError(
                        f"data.augment.{type(t).__name__}: an intensity transform would change the input "
                        "but not its restoration target; use geometric transforms only"
                    )

    def __call__(self, image: np.ndarray, target: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self.pipeline is None:
            return image, target
        self.pipeline.set_random_seed(seed)
        img = np.ascontiguousarray(np.moveaxis(image, 0, -1))  # channel-last for albumentations
        key_img, key_mask = ("image", "mask") if self.spatial_dims == 2 else ("volume", "mask3d")
        data: dict[str, np.ndarray] = {key_img: img}
        if target is not None and self.target_kind == "mask":
            data[key_mask] = np.ascontiguousarray(target.astype(np.int32, copy=False))
        elif target is not None and self.target_kind == "image":
            # Stack input and target as channels so that both see the very same geometry.
            both = np.concatenate([img, np.moveaxis(target, 0, -1)], axis=-1)
            data = {key_img: np.ascontiguousarray(both)}
        out = self.pipeline(**data)
        if target is not None and self.target_kind == "image":
            both = _same_shape(np.moveaxis(out[key_img], -1, 0), image.shape[1:])
            return np.ascontiguousarray(both[: image.shape[0]]), np.ascontiguousarray(both[image.shape[0]:])
        new_image = _same_shape(np.moveaxis(out[key_img], -1, 0), image.shape[1:])
        new_target = out.get(key_mask) if target is not None and self.target_kind == "mask" else target
        if new_target is not None and new_target is not target:
            new_target = _same_shape(new_target, image.shape[1:])
        return np.ascontiguousarray(new_image), new_target


def _same_shape(array: np.ndarray, spatial_shape) -> np.ndarray:
    """A quarter turn of a patch that is not square in-plane swaps its last two axes, and patches of
    one batch would no longer stack: swap them back (turn plus transpose is a flip, as valid an
    augmentation)."""
    spatial = tuple(array.shape[-len(spatial_shape):])
    if spatial != tuple(spatial_shape) and spatial == (*spatial_shape[:-2], spatial_shape[-1], spatial_shape[-2]):
        array = np.ascontiguousarray(np.swapaxes(array, -1, -2))
    return array
