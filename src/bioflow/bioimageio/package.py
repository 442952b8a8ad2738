"""bioimage.io model packages as files: what counts as one, reading and checking its description,
its weights' runtimes, and its tensors' axes in bioflow's layout.

Packages are read with bioimage.io's own libraries (``bioimageio.spec``, ``bioimageio.core``), an
optional extra (``pip install 'bioflow[bioimageio]'``): without it, every use is one line saying so.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bioflow.errors import BioflowError

YAML_NAMES = ("rdf.yaml", "bioimageio.yaml")
#: Weight formats tried, in this order, among those present and runnable here.
WEIGHT_PRIORITY = ("pytorch_state_dict", "torchscript", "onnx", "tensorflow_saved_model_bundle", "keras_v3", "keras_hdf5")
_BACKENDS = {"pytorch_state_dict": "torch", "torchscript": "torch", "onnx": "onnxruntime",
             "tensorflow_saved_model_bundle": "tensorflow", "keras_hdf5": "tensorflow", "keras_v3": "keras"}

#: Where config.bioflow lists the outputs in the input's units that need the input's own (per-image)
#: normalisation inverted, which the format's post-processing cannot express (written by the
#: exporter, applied by the runtime).
PER_IMAGE_UNITS = "per_image_units"
#: Outputs that are spreads in the input's units (a std): only the per-image scale is undone.
PER_IMAGE_SCALE = "per_image_scale"


class PackageError(BioflowError):
    """A bioimage.io package cannot be read or run."""


def is_package(model: str) -> bool:
    """Whether ``model`` names a bioimage.io package (a .zip, an rdf.yaml, or a folder with one)."""
    path = Path(model)
    if path.is_dir():
        return any((path / name).is_file() for name in YAML_NAMES)
    return path.suffix.lower() in (".zip", ".yaml", ".yml")


def require_core() -> None:
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError as exc:
        raise PackageError(
            f"bioimage.io packages need the optional extra ({exc.name or exc} is not installed): "
            "pip install 'bioflow[bioimageio]'"
        ) from None


def first_error(summary) -> str:
    """The first error of a bioimage.io validation summary, as one line."""
    for detail in summary.details:
        for error in detail.errors:
            loc = ".".join(str(p) for p in error.loc)
            msg = " ".join(str(error.msg).split())
            return f"{loc}: {msg}" if loc else msg
    return f"validation status {summary.status}"


def open_package(model: str):
    """The v0.5 model description of a package file or folder; a one-line error if it is none."""
    require_core()
    path = Path(model)
    if not path.exists():
        raise PackageError(f"{path}: no such file or folder")
    source: Any = path
    if path.is_file() and path.suffix.lower() == ".zip":
        if not zipfile.is_zipfile(path):
            raise PackageError(f"{path}: not a readable zip file (corrupt or truncated?)")
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError) as exc:
            raise PackageError(f"{path}: not a readable zip file ({exc})") from None
        if not names & set(YAML_NAMES):
            hint = "; it looks like a bioflow checkpoint: name it .ckpt" if any(n.endswith("data.pkl") for n in names) else ""
            raise PackageError(f"{path}: not a bioimage.io package (no rdf.yaml or bioimageio.yaml inside){hint}")
    elif path.is_dir():
        source = next(path / n for n in YAML_NAMES if (path / n).is_file())
    from bioimageio.spec import load_description
    from bioimageio.spec.model.v0_5 import ModelDescr

    try:
        descr = load_description(source, format_version="latest", perform_io_checks=False)
    except Exception as exc:
        raise PackageError(f"{path}: not a readable bioimage.io description ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]})") from None
    kind = getattr(descr, "type", None)
    if kind is not None and kind != "model":
        raise PackageError(f"{path}: a bioimage.io {kind}, not a model")
    if not isinstance(descr, ModelDescr):
        raise PackageError(f"{path}: not a valid bioimage.io model ({first_error(descr.validation_summary)})")
    return descr


def bioflow_section(descr) -> dict[str, Any] | None:
    """``config.bioflow`` of a package bioflow wrote, else None."""
    extra = descr.config.model_extra or {}
    section = extra.get("bioflow")
    return section if isinstance(section, dict) and "config" in section else None


def runnable_formats(descr) -> list[str]:
    """Weight formats of the package that can run here, in priority order."""
    import importlib.util

    present = [f for f in WEIGHT_PRIORITY if getattr(descr.weights, f, None) is not None]
    runnable = [f for f in present if importlib.util.find_spec(_BACKENDS[f]) is not None]
    if not runnable:
        missing = sorted({_BACKENDS[f] for f in present})
        raise PackageError(
            f"{descr.name}: its weights ({', '.join(present)}) cannot run here: install {' or '.join(missing)}"
        )
    return runnable


def create_adapter(descr, device: str, origin: str):
    """bioimageio.core's model adapter for the first weight format that loads."""
    from bioimageio.core.backends import create_model_adapter

    formats = runnable_formats(descr)
    try:
        return create_model_adapter(descr, devices=[device], weight_format_priority_order=formats)
    except Exception as exc:
        raise PackageError(f"{origin}: none of its weights ({', '.join(formats)}) could be loaded "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:240]})") from None


# -- tensors and axes ----------------------------------------------------------------------------------
@dataclass
class TensorAxes:
    """A package tensor's axes: their ids in order, each one's name in bioflow's layout ("batch",
    "channel" or the space axis id), and the space axes in bioflow's (Z, Y, X) order."""

    ids: list[str]
    names: list[str]
    spatial: list[str]

    @classmethod
    def of(cls, descr, origin: str) -> "TensorAxes":
        ids, names, spatial = [], [], []
        for a in descr.axes:
            if a.type in ("batch", "channel"):
                names.append(a.type)
            elif a.type == "space":
                names.append(str(a.id))
                spatial.append(str(a.id))
            else:
                raise PackageError(f"{origin}: tensor '{descr.id}' has a {a.type} axis '{a.id}'; bioflow runs images with "
                                   "batch, channel and space axes only")
            ids.append(str(a.id))
        if len(spatial) not in (2, 3):
            raise PackageError(f"{origin}: tensor '{descr.id}' has {len(spatial)} space axes; bioflow runs 2D and 3D images")
        if set(spatial) <= set("zyx"):
            spatial = sorted(spatial, key="zyx".index)
        return cls(ids, names, spatial)

    @property
    def has_batch(self) -> bool:
        return "batch" in self.names

    @property
    def layout(self) -> list[str]:
        """bioflow's layout of a batch: batch, channel, spatial axes."""
        return ["batch", "channel", *self.spatial]

    def to_package(self, array: np.ndarray) -> np.ndarray:
        """``(N, C, *spatial)`` in bioflow's layout to this tensor's axis order (N, C dropped if absent)."""
        missing = tuple(i for i, name in enumerate(self.layout) if name not in self.names)
        kept = [name for name in self.layout if name in self.names]
        return np.transpose(array.squeeze(missing) if missing else array, [kept.index(n) for n in self.names])

    def from_package(self, array: np.ndarray) -> np.ndarray:
        """This tensor's axis order to ``(N, C, *spatial)`` (singleton N, C where absent)."""
        order = list(self.names)
        for name in ("channel", "batch"):
            if name not in order:
                array, order = array[None], [name, *order]
        return np.transpose(array, [order.index(n) for n in self.layout])


def axis_of(descr, axis_id: str):
    return next(a for a in descr.axes if str(a.id) == axis_id)


@dataclass
class OutputInfo:
    id: str
    axes: TensorAxes
    channels: int | None  # None: no channel axis
    dtype: Any


