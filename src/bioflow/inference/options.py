"""How to predict: one typed object, checked once when it is made, for the CLI, ``bioflow.predict``,
``Model.predict`` and the contract kit alike.

>>> PredictionOptions(tile_size=(512,), tta=True).tiling()["tile_size"]
[512]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from bioflow.errors import ConfigError, did_you_mean
from bioflow.precision import PREDICTION_PRECISIONS

#: How overlapping tiles are combined (see :mod:`bioflow.inference.tiling`).
BLENDS = ("cosine", "none")
#: Output formats of ``bioflow predict`` (auto: the input's, TIFF for TIFF and OME-Zarr for OME-Zarr).
OUT_FORMATS = ("auto", "tiff", "ome-zarr")
#: The options of the tiler itself (what a predictor's ``predict_array`` takes).
TILING = ("tile_size", "overlap", "batch_size", "tta", "tta_spread", "blend", "progress")


@dataclass(frozen=True)
class PredictionOptions:
    """Options of a prediction (``bioflow predict``'s, by the same names).

    ``tile_size`` / ``overlap``: one value or one per spatial axis (default: from free memory / the
    receptive field); ``batch_size``: tiles per forward pass; ``tta``: average over flips and
    quarter turns; ``tta_spread``: also the spread between those augmented predictions per
    pixel (an uncertainty for any model; implies ``tta``); ``blend``: ``cosine`` or ``none``; ``progress``: a progress bar (or, in Python, a function
    called with tiles done and tiles in all, which may raise to cancel); ``axes``: the
    input files' axes where their metadata do not say; ``rescale``: resample images whose pixel
    size differs from training; ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...;
    ``precision``: the network's precision (default: the model's); ``overwrite``: replace earlier
    outputs (never inputs); ``confidence``: also a per-pixel confidence map (segmentation);
    ``out_format``: ``auto`` (the input's), ``tiff`` or ``ome-zarr``; ``level``: the resolution
    level of OME-Zarr inputs; ``block_size``: the edge of the blocks OME-Zarr outputs are predicted
    in (one value or one per axis, rounded up to whole chunks; default 2048 in 2D, 64x256x256 in 3D).
    """

    tile_size: Optional[tuple[int, ...]] = None
    overlap: Optional[tuple[int, ...]] = None
    batch_size: Optional[int] = None
    tta: bool = False
    tta_spread: bool = False
    blend: str = "cosine"
    progress: Any = True  # a bar, or a function (tiles_done, tiles_total)
    axes: Optional[str] = None
    rescale: bool = False
    device: str = "auto"
    precision: Optional[str] = None
    overwrite: bool = False
    confidence: bool = False
    out_format: str = "auto"
    level: int = 0
    block_size: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        for name, low in (("tile_size", 1), ("overlap", 0), ("block_size", 1)):
            values = getattr(self, name)
            if values is None:
                continue
            values = (values,) if isinstance(values, int) else tuple(values)
            flag = "--" + name.replace("_", "-")
            if not values or any(not isinstance(v, int) or isinstance(v, bool) for v in values):
                raise ConfigError(f"{flag} {' '.join(str(v) for v in values)}: whole numbers, one or one per axis")
            if any(v < low for v in values):
                raise ConfigError(f"{flag} {' '.join(str(v) for v in values)}: must be {'positive' if low else '0 or more'}")
            object.__setattr__(self, name, values)
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or int(self.batch_size) < 1):
            raise ConfigError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.out_format not in OUT_FORMATS:
            raise ConfigError(f"--out-format {self.out_format}: one of {', '.join(OUT_FORMATS)}")
        if isinstance(self.level, bool) or not isinstance(self.level, int) or self.level < 0:
            raise ConfigError(f"--level {self.level}: a resolution level of OME-Zarr inputs (0, 1, ...)")
        if self.blend not in BLENDS:
            raise ConfigError(f"--blend {self.blend}: one of {', '.join(BLENDS)}")
        if self.axes is not None and (not self.axes or set(self.axes.upper()) - set("TCZYXS")):
            raise ConfigError(f"--axes {self.axes}: not an axes string (letters from T, C, Z, Y, X, S)")
        if self.precision is not None and self.precision not in PREDICTION_PRECISIONS:
            raise ConfigError(f"--precision: '{self.precision}' is not one of {', '.join(PREDICTION_PRECISIONS)}")

    @classmethod
    def of(cls, allowed: Sequence[str] | None = None, **given: Any) -> "PredictionOptions":
        """Options from keyword arguments, ``None`` meaning the default; an unknown (or, with
        ``allowed``, an unsupported) name is a one-line error with the names that exist."""
        names = list(allowed) if allowed is not None else [f.name for f in dataclasses.fields(cls)]
        for key in given:
            if key not in names:
                raise ConfigError(f"prediction option '{key}' does not exist{did_you_mean(key, names)} "
                                  f"(options: {', '.join(names)})")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        return cls(**{k: (defaults[k] if v is None else v) for k, v in given.items()})

    def tiling(self) -> dict[str, Any]:
        """The tiler's options, as a predictor's ``predict_array`` takes them."""
        values = {name: getattr(self, name) for name in TILING}
        values["tta"] = self.tta or self.tta_spread
        for name in ("tile_size", "overlap"):
            values[name] = None if values[name] is None else list(values[name])
        return values
