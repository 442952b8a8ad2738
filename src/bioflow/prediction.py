"""``bioflow predict``: apply a trained model to TIFF files of any size.

Images are read lazily, predicted tile by tile (see :mod:`bioflow.inference.tiling`) and the
results are written strip by strip into memory-mapped TIFF files, so memory depends on the tile
and not on the image. Each output is first written under a temporary name and renamed when
complete: an interrupted or failed prediction leaves no half-written file under a final name, and
no input or existing file is ever overwritten (unless ``overwrite`` is given for earlier outputs).

Outputs keep the input's axis order (without the channel axis for label images) and its pixel
size, as OME-TIFF metadata.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bioflow.data.records import check_finite
from bioflow.errors import BioflowError, DataError
from bioflow.inference.objects import write_csv
from bioflow.inference.options import TILING, PredictionOptions
from bioflow.inference.outputs import OutputSpec, output_blocks

log = logging.getLogger(__name__)

_PIXEL_SIZE_TOLERANCE = 0.05


def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """TIFF files given directly or found in given folders, in a stable order."""
    from bioflow.data.tiff import TIFF_SUFFIXES

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(TIFF_SUFFIXES))
            if not found:
                raise DataError(f"{path}: no .tif/.tiff files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def output_paths(files: Sequence[Path], out_dir: Path, specs: Sequence[OutputSpec], overwrite: bool) -> list[dict[str, Path]]:
    """The output files of every input; refuses to overwrite inputs (always) or other files."""
    from bioflow.data.tiff import file_stem

    inputs = {f.resolve() for f in files}
    seen: dict[Path, Path] = {}
    plan = []
    for f in files:
        targets = {}
        for i, spec in enumerate(specs):
            name = file_stem(f) + ("" if i == 0 else f"_{spec.name}") + (".csv" if spec.table else ".tif")
            target = (out_dir / name).resolve()
            if target in inputs:
                raise DataError(
                    f"{out_dir}: writing {name} there would overwrite the input {target}; choose another --out folder"
                )
            if target in seen:
                raise DataError(f"{f} and {seen[target]} would both be written to {target}; rename one of them")
            if target.exists() and not overwrite:
                raise DataError(f"{target}: exists already; remove it, choose another --out folder, or pass --overwrite")
            seen[target] = f
            targets[spec.name] = target
        plan.append(targets)
    return plan


def output_axes(file_axes: str, channels: int | None, frames: int = 1) -> tuple[str, list[int]]:
    """Axes of an output in the input's order, and the permutation from bioflow's layout to them.

    The layout is ([T], [C], [Z], Y, X): T for a time-lapse (``frames`` > 1), C when the output has
    channels. Input axes other than time, channels and Z/Y/X are dropped; a channel axis goes where
    the input had one, or first (after T).
    """
    keep = "TCSZYX" if frames > 1 else "CSZYX"
    axes = "".join("C" if a in "CS" else a for a in file_axes.upper() if a in keep)
    if channels is None:
        axes = axes.replace("C", "")
    elif "C" not in axes:
        axes = axes.replace("T", "TC") if "T" in axes else "C" + axes
    layout = ("T" if "T" in axes else "") + ("C" if channels is not None else "") + "".join(a for a in "ZYX" if a in axes)
    return axes, [layout.index(a) for a in axes]


def _spatial_sizes(axes: str, pixel_size: Sequence[float] | None) -> dict[str, float]:
    if pixel_size is None:
        return {}
    spatial = [a for a in "ZYX" if a in axes]
    return {a: float(size) for a, size in zip(spatial[-len(pixel_size):], pixel_size[-len(spatial):])}


def _ome_metadata(axes: str, pixel_size: Sequence[float] | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"axes": axes}
    for a, size in _spatial_sizes(axes, pixel_size).items():
        meta[f"PhysicalSize{a}"] = size
        meta[f"PhysicalSize{a}Unit"] = "µm"
    return meta


def _resolution(axes: str, pixel_size: Sequence[float] | None) -> dict[str, Any]:
    """TIFF resolution tags (pixels per centimetre) for simple readers that ignore OME metadata."""
    sizes = _spatial_sizes(axes, pixel_size)
    if "X" not in sizes or "Y" not in sizes or min(sizes["X"], sizes["Y"]) <= 0:
        return {}
    return {"resolution": (1e4 / sizes["X"], 1e4 / sizes["Y"]), "resolutionunit": "CENTIMETER"}


class TiffWriter:
    """An output TIFF written strip by strip with plain file writes, renamed into place when done."""

    def __init__(self, target: Path, spatial_shape: Sequence[int], spec: OutputSpec, file_axes: str,
                 pixel_size: Sequence[float] | None, frames: int = 1) -> None:
        import tifffile

        from bioflow.data.rawfile import RawArrayFile

        self.target = target
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        self.partial = target.with_name(f".{target.name}.partial")
        axes, self.perm = output_axes(file_axes, spec.channels, frames)
        self.timed = "T" in axes
        layout_shape = ((frames,) if self.timed else ()) + ((spec.channels,) if spec.channels is not None else ())
        layout_shape += tuple(spatial_shape)
        shape = tuple(layout_shape[i] for i in self.perm)
        # An empty, uncompressed TIFF of the final size; its data block is then filled in place.
        tifffile.imwrite(str(self.partial), shape=shape, dtype=spec.dtype, ome=True,
                         metadata=_ome_metadata(axes, pixel_size), **_resolution(axes, pixel_size))
        with tifffile.TiffFile(str(self.partial)) as tif:
            offset = tif.series[0].dataoffset
        self.file = RawArrayFile(self.partial, offset, shape, np.dtype(spec.dtype).newbyteorder("<"), writable=True)
        self.has_channels = spec.channels is not None

    def write(self, start: int, block: np.ndarray, frame: int = 0) -> None:
        """Write rows ``start..`` of the first spatial axis of time point ``frame`` (``block`` in
        bioflow's layout order: [C], [Z], Y, X)."""
        layout_start = ([frame] if self.timed else []) + ([0, start] if self.has_channels else [start])
        layout_start += [0] * (block.ndim + self.timed - len(layout_start))
        data = block[None] if self.timed else block
        self.file.write([layout_start[i] for i in self.perm], np.transpose(data, self.perm))

    def close(self) -> None:
        self.file.close()
        os.replace(self.partial, self.target)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def choose_device(device: str, option: str = "--device") -> str:
    """``auto`` (a CUDA GPU if there is one, else the CPU) or a device that exists here."""
    import torch

    from bioflow.errors import ConfigError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{option} {device}: not a device (auto, cpu, cuda, cuda:1, mps)") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{option} {device}: no CUDA GPU is available on this machine; use --device cpu")
        if chosen.index is not None and chosen.index >= count:
            raise ConfigError(f"{option} {device}: this machine has {count} CUDA GPU(s) (cuda:0 .. cuda:{count - 1})")
    elif chosen.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"{option} {device}: Apple's MPS is not available on this machine; use --device cpu")
    elif chosen.type != "cpu":
        raise ConfigError(f"{option} {device}: bioflow predicts on cpu, cuda or mps")
    return str(chosen)


def predict(
    model: str,
    inputs: Sequence[str],
    out: str,
    *,
    project_dir: str | None = None,
    tracking_uri: str | None = None,
    options: PredictionOptions | None = None,
    **settings: Any,
) -> list[dict[str, Path]]:
    """Predict every input TIFF with ``model`` (a checkpoint file, an MLflow run id or a bioimage.io package).

    ``options`` (or the same names as keyword arguments: ``tile_size``, ``tta``, ``axes``, ...; see
    :class:`~bioflow.inference.options.PredictionOptions`) say how; they are checked before any work.
    Every readable input is predicted even when others fail; the failures are reported one line
    each, and then raised together as a :class:`PredictionErrors`. Outputs are written under
    temporary names and renamed when complete, so a failed input leaves nothing behind; ``out``
    is created only when there is something to write.

    Returns, for each input predicted, the output files written (by output name).
    """
    from bioflow.loading import load_model
    from bioflow.tracking.store import Store, default_project_dir

    if options is not None and settings:
        raise BioflowError(f"predict: give the options as one PredictionOptions or as keywords, not both ({', '.join(settings)})")
    opts = options if options is not None else PredictionOptions.of(**settings)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is not a folder; give a folder for the outputs")
    device = choose_device(opts.device)
    files = collect_inputs(inputs)
    explicit = project_dir is not None or tracking_uri is not None
    store = Store.create(project_dir or default_project_dir(), tracking_uri)
    task = load_model(model, store, inference=True, explicit_store=explicit).task
    for line in task.prediction_caveats():
        print(f"bioflow: note: {line}", file=sys.stderr)
    if opts.precision is not None:  # instead of the model's predict.precision
        if getattr(task, "context", None) is None:
            raise BioflowError(f"--precision: {model} does not predict through bioflow's network; predict without it")
        task.context.predict["precision"] = opts.precision
    request_outputs(task, opts)
    task.to(device)
    plan = output_paths(files, out_dir, outputs_of(task, opts.tta_spread), opts.overwrite)
    results, failures, fit_rows = [], [], []
    for f, targets in zip(files, plan):
        try:
            verdict = _predict_file(task, f, targets, out_dir, opts)
        except BioflowError as exc:
            if len(files) == 1:
                raise
            failures.append(exc.one_line())
            print(f"bioflow: error: {exc.one_line()}", file=sys.stderr, flush=True)
            continue
        results.append(targets)
        print(f"bioflow: {f} -> {', '.join(str(t) for t in targets.values())}", flush=True)
        if verdict is not None:
            fit_rows.append({"file": str(f), **verdict})
            if not verdict["fits"]:
                log.warning("%s does not look like the training data (score %.2f above %.2f; most unlike it: %s): "
                            "doubt its outputs", f, verdict["score"], verdict["threshold"], verdict["reason"])
    if fit_rows:
        write_fit_report(out_dir / FIT_REPORT, fit_rows)
    if failures:
        raise PredictionErrors(failures, len(files))
    return results


#: Written beside the outputs: how well each input fits the model's training data.
FIT_REPORT = "fit_report.csv"


def write_fit_report(path: Path, rows: list[dict[str, Any]]) -> None:
    """The inputs' fit to the training data as CSV (written under a hidden name, then renamed);
    rows of other files from an earlier prediction into the same folder are kept."""
    import csv

    columns = ["file", "score", "threshold", "fits", "reason", "intensity", "noise", "content"]
    ours = {str(row["file"]) for row in rows}
    earlier = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as fh:
            earlier = [r for r in csv.DictReader(fh) if r.get("file") not in ours]
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(earlier)
        writer.writerows({c: f"{row[c]:.4g}" if isinstance(row.get(c), float) else row.get(c, "") for c in columns}
                         for row in rows)
    os.replace(partial, path)


def request_outputs(task, opts: PredictionOptions) -> None:
    """Outputs a task gives on request (``--confidence``): asked of a task that has none, one line."""
    if getattr(task, "gives_confidence", False):
        task.context.predict["confidence"] = bool(opts.confidence)
    elif opts.confidence:
        raise BioflowError("--confidence: this model gives no confidence map (U-Net segmentation does; StarDist "
                           "writes per-object probabilities to <name>_objects.csv; restoration: task.probabilistic=true)")


class PredictionErrors(BioflowError):
    """Some inputs could not be predicted (the others were)."""

    def __init__(self, messages: list[str], total: int) -> None:
        self.messages = messages
        super().__init__(f"{len(messages)} of {total} input file(s) failed (each reported above); the others were predicted")


def _predict_file(task, f: Path, targets: dict[str, Path], out_dir: Path, opts: PredictionOptions):
    """Predict one file (every time point of a time-lapse) into its outputs; returns how its first
    frame fits the model's training data (None for models without a fingerprint)."""
    import torch

    from bioflow.data.tiff import read_tiff_frames
    from bioflow.data.views import SubArray, channel_indices
    from bioflow.inference.fit import FitObserver

    frames = read_tiff_frames(f, opts.axes, channels=True, axes_option="--axes")
    options = opts.tiling()
    wanted = getattr(task, "channel_selection", None)  # models from other tools choose none
    arrays = []
    for frame in frames:
        array = frame.array
        if wanted:
            array = SubArray(array, channels=channel_indices(wanted, array.shape[0], frame.channel_names, str(f)))
        arrays.append(array)
    first = frames[0]
    _check_compatible(task, arrays[0], f)
    for array in arrays[1:]:
        check_finite(array, str(f), when="prediction")
    factor = _resolution_factor(task, first.pixel_size, f, opts.rescale)
    shape = tuple(arrays[0].shape[1:])
    out_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, TiffWriter] = {}
    tables: dict[str, list] = {}  # per table output, one table per frame: written when all are done
    partials: list[Path] = []

    def writer(spec: OutputSpec) -> TiffWriter:
        if spec.name not in writers:
            writers[spec.name] = TiffWriter(targets[spec.name], shape, spec, first.file_axes, first.pixel_size, len(frames))
        return writers[spec.name]

    verdict = None
    try:
        for t, array in enumerate(arrays):
            session = task.prediction_session(shape, out_dir)
            try:
                for spec in session.outputs:
                    if spec.streamed:
                        writer(spec)
                if opts.tta_spread:
                    writer(SPREAD)
                # a rescaled prediction comes back at the image's size, grid or not
                stride = (_spread_stride(task) if factor is None else ()) if opts.tta_spread else None
                sink = _session_sink(session, writers, t, stride)
                watch = t == 0 and getattr(task, "fit_reference", None) is not None
                with torch.no_grad(), (FitObserver(task) if watch else nullcontext()) as seen:
                    if factor is None:
                        task.predict_array(array, sink=sink, **options)
                    else:
                        _predict_rescaled(task, array, factor, sink, options)
                if watch:
                    verdict = seen.verdict()  # the first frame's fit, from the tiles just predicted
                finished = session.finish()
                for spec in session.outputs:
                    if not spec.streamed and not spec.table:
                        for start, block in output_blocks(finished[spec.name]):
                            writer(spec).write(start, block, frame=t)
                for spec in session.outputs:  # tables last: they are counted as the images pass
                    if spec.table:
                        tables.setdefault(spec.name, []).append(finished[spec.name]())
            finally:
                session.close()
        for name, per_frame in tables.items():
            partial = targets[name].with_name(f".{targets[name].name}.partial")
            write_csv(partial, per_frame, frames=len(frames) > 1)
            partials.append(partial)
        for w in writers.values():
            w.close()
        for partial in partials:
            os.replace(partial, partial.with_name(partial.name[1:-len(".partial")]))
        return verdict
    except BaseException:
        for w in writers.values():
            w.abort()
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise


class ArrayWriter:
    """Collects one output of one image in memory (the in-memory twin of :class:`TiffWriter`)."""

    def __init__(self, spatial_shape: Sequence[int], spec: OutputSpec) -> None:
        shape = ((spec.channels,) if spec.channels is not None else ()) + tuple(spatial_shape)
        self.array = np.zeros(shape, dtype=spec.dtype)
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        self.has_channels = spec.channels is not None

    def write(self, start: int, block: np.ndarray, frame: int = 0) -> None:
        rows = slice(start, start + block.shape[1 if self.has_channels else 0])
        self.array[(slice(None), rows) if self.has_channels else rows] = block


def predict_array(task, array, options: PredictionOptions | None = None, check_fit: bool = False,
                  **tiling: Any) -> dict[str, Any]:
    """Every output of ``task`` (a predictor) for one channel-first image in memory, tiled like
    ``bioflow predict`` with ``options`` (or the tiler's options as keywords: ``tile_size``,
    ``overlap``, ``batch_size``, ``tta``, ``blend``, ``progress``). With ``check_fit``, and a
    model that has a fingerprint of its training data, also ``"fit"``: how the image fits it."""
    import torch

    from bioflow.inference.fit import FitObserver

    if options is None:
        options = PredictionOptions.of(allowed=TILING, **{"progress": False, **tiling})
    options = options.tiling()

    _check_compatible(task, array, Path("the image"))
    shape = tuple(array.shape[1:])
    session = task.prediction_session(shape)
    spread = bool(options.get("tta_spread"))
    writers = {spec.name: ArrayWriter(shape, spec) for spec in [*session.outputs, *([SPREAD] if spread else [])]
               if spec.streamed}
    tables = {spec.name for spec in session.outputs if spec.table}
    try:
        watch = check_fit and getattr(task, "fit_reference", None) is not None
        with torch.no_grad(), (FitObserver(task) if watch else nullcontext()) as seen:
            task.predict_array(array, sink=_session_sink(session, writers, 0, _spread_stride(task) if spread else None),
                               **options)
        finished = session.finish()
        out: dict[str, Any] = {name: w.array for name, w in writers.items()}
        out.update({name: np.asarray(value) for name, value in finished.items() if name not in tables})
        out.update({name: finished[name]() for name in tables})  # after the images: counted as they pass
        if watch:
            out["fit"] = seen.verdict()
    finally:
        session.close()
    return out


#: ``--tta-spread``: how much the predictions of the flipped and turned image disagree, per pixel.
SPREAD = OutputSpec("tta_spread", None, np.float32)


def outputs_of(task, tta_spread: bool = False) -> list[OutputSpec]:
    """The outputs a prediction writes per input: the task's, and the TTA spread on request."""
    return [*task.prediction_outputs(), *([SPREAD] if tta_spread else [])]


def _spread_stride(task) -> tuple[int, ...]:
    stride = task.output_stride() if hasattr(task, "output_stride") else getattr(task, "stride", None)
    return tuple(int(g) for g in stride) if stride else ()


def _write_spread(writer, start: int, block, stride: Sequence[int], frame: int) -> None:
    """A strip of the spread, brought from the output grid (``stride``; empty: the image's own) to
    the image's pixels."""
    import torch

    spatial = writer.spatial_shape
    if any(int(g) > 1 for g in stride):  # on a coarser grid: each value covers its cell
        for axis, g in enumerate(stride):
            block = torch.repeat_interleave(block, int(g), dim=axis)
        start *= int(stride[0])
    rows = max(0, min(block.shape[0], spatial[0] - start))
    crop = (slice(0, rows),) + tuple(slice(0, s) for s in spatial[1:])
    writer.write(start, block[crop].float().cpu().numpy(), frame=frame)


# Strips are finalised in chunks of about this many pixels, to bound temporary arrays.
_FINALIZE_PIXELS = 1 << 21


def _session_sink(session, writers: dict[str, TiffWriter], frame: int = 0, spread_stride: Sequence[int] | None = None):
    """The sink that hands strips of raw output to the session and writes its blocks; with
    ``spread_stride``, the last channel is the TTA spread (on the output grid of that stride),
    written as it is to the ``tta_spread`` output at the image's size."""
    def sink(start: int, raw) -> None:
        if spread_stride is not None:
            _write_spread(writers[SPREAD.name], start, raw[-1], spread_stride, frame)
            raw = raw[:-1]
        row_pixels = max(1, int(np.prod(raw.shape[2:])))
        step = max(1, _FINALIZE_PIXELS // row_pixels)
        for offset in range(0, raw.shape[1], step):
            for name, block in session.block(start + offset, raw[:, offset:offset + step]).items():
                writers[name].write(start + offset, block, frame=frame)

    return sink


def _check_compatible(task, array, path: Path) -> None:
    info = task.data_info
    channels, spatial = array.shape[0], array.ndim - 1
    if spatial != info.spatial_dims:
        raise DataError(f"{path}: a {spatial}D image, but the model was trained on {info.spatial_dims}D images")
    if channels != info.in_channels:
        raise DataError(
            f"{path}: the image has {channels} channel(s) but the model expects {info.in_channels} "
            "(check the axes: declare them with --axes if the file has no metadata)"
        )
    check_finite(array, str(path), when="prediction")


def _resolution_factor(task, pixel_size, path: Path, rescale: bool) -> list[float] | None:
    """Zoom factors that bring the image to the training pixel size, if ``rescale`` is asked."""
    trained = task.data_info.pixel_size
    if trained is None or pixel_size is None:
        return None
    ratio = [p / t for p, t in zip(pixel_size, trained)]
    if all(abs(r - 1) <= _PIXEL_SIZE_TOLERANCE for r in ratio):
        return None
    sizes = "x".join(f"{p:g}" for p in pixel_size) + " µm"
    trained_sizes = "x".join(f"{t:g}" for t in trained) + " µm"
    if not rescale:
        log.warning(
            "%s: pixel size %s differs from the training pixel size %s; objects appear at another scale than "
            "the model learnt (pass --rescale to resample the image to the training pixel size)", path, sizes, trained_sizes,
        )
        return None
    return ratio


def _predict_rescaled(task, array, factor, sink, options) -> None:
    """Resample to the training pixel size, predict, resample the raw output back, then ``sink`` it."""
    import torch
    from scipy import ndimage

    data = np.asarray(array, dtype=np.float32)
    zoomed = np.stack([ndimage.zoom(c, factor, order=1) for c in data])
    parts: list[torch.Tensor] = []
    task.predict_array(zoomed, sink=lambda start, raw: parts.append(raw.cpu()), **options)
    raw = torch.cat(parts, dim=1).numpy()
    shape = data.shape[1:]
    back = [s / z for s, z in zip(shape, raw.shape[1:])]
    restored = np.stack([ndimage.zoom(c, back, order=1) for c in raw])
    restored = restored[(slice(None),) + tuple(slice(0, s) for s in shape)]
    if restored.shape[1:] != shape:  # zoom rounding: pad the last row/column by repetition
        pad = [(0, 0)] + [(0, s - r) for s, r in zip(shape, restored.shape[1:])]
        restored = np.pad(restored, pad, mode="edge")
    sink(0, torch.from_numpy(np.ascontiguousarray(restored)))
