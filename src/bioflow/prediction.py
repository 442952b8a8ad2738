"""``bioflow predict``: apply a trained model to TIFF files and OME-Zarr stores of any size.

Images are read lazily and predicted tile by tile (see :mod:`bioflow.inference.tiling`): TIFF
outputs are written strip by strip, OME-Zarr outputs block by block in whole chunks (see
:mod:`bioflow.inference.blocks`), so memory depends on the tile and the block, not on the image.
Each output is first written under a temporary name and renamed when complete: an interrupted or
failed prediction leaves no half-written file under a final name, and no input or existing file is
ever overwritten (unless ``overwrite`` is given for earlier outputs). The same command into the
same folder resumes an interrupted job (:mod:`bioflow.inference.journal`); started by torchrun or
under SLURM, several processes share out the inputs and blocks
(:mod:`bioflow.inference.distributed`).

Outputs keep the input's axis order (without the channel axis for label images) and its pixel
size, as OME-TIFF or NGFF metadata.
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
from bioflow.data.output_files import make_writer, provenance
from bioflow.data.writers import TiffWriter, output_axes  # noqa: F401 (part of this module's interface)
from bioflow.errors import BioflowError, DataError
from bioflow.inference.blocks import BlockedFile, blocked_file
from bioflow.inference.fit import FIT_REPORT, write_fit_report  # noqa: F401 (part of this module's interface)
from bioflow.inference.journal import Journal, forget, repeatable_options
from bioflow.inference.objects import write_csv
from bioflow.inference.options import TILING, PredictionOptions
from bioflow.inference.outputs import OutputSpec, output_blocks
from bioflow.inference.streams import (SPREAD, ArrayWriter, check_compatible, input_pixels, open_input,  # noqa: F401
                                       outputs_of, predict_rescaled, resolution_factor, session_sink, spread_stride,
                                       write_spread)

log = logging.getLogger(__name__)
_write_spread = write_spread  # the name tests know

def collect_inputs(inputs: Sequence[str]) -> list[Path]:
    """TIFF files and OME-Zarr stores given directly or found in given folders, in a stable order."""
    from bioflow.data.images import find_images
    from bioflow.data.omezarr import is_zarr

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if is_zarr(path):
            files.append(path)
        elif path.is_dir():
            found = find_images(path)
            if not found:
                raise DataError(f"{path}: no .tif/.tiff files or OME-Zarr stores in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def output_format(f: Path, out_format: str) -> str:
    """``tiff`` or ``ome-zarr``: as asked, or (``auto``) the input's own."""
    from bioflow.data.omezarr import is_zarr

    if out_format != "auto":
        return out_format
    return "ome-zarr" if is_zarr(f) else "tiff"


def output_paths(files: Sequence[Path], out_dir: Path, specs: Sequence[OutputSpec], overwrite: bool,
                 out_format: str = "auto", journal: Journal | None = None) -> tuple[list[dict[str, Path]], list[bool]]:
    """The output files of every input, and whether each input is done already (all its outputs
    made by an earlier run of the same job, see :mod:`bioflow.inference.journal`). Refuses to
    overwrite inputs (always) or files that are not the same job's (unless ``overwrite``)."""
    from bioflow.data.images import image_stem

    inputs = {f.resolve() for f in files}
    seen: dict[Path, Path] = {}
    plan, done = [], []
    ours = journal is not None and journal.same and not overwrite
    for f in files:
        targets = {}
        suffix = ".ome.zarr" if output_format(f, out_format) == "ome-zarr" else ".tif"
        for i, spec in enumerate(specs):
            name = image_stem(f) + ("" if i == 0 else f"_{spec.name}") + (".csv" if spec.table else suffix)
            target = (out_dir / name).resolve()
            if target in inputs or any(target == p or p in target.parents for p in inputs):
                raise DataError(
                    f"{out_dir}: writing {name} there would overwrite the input {target}; choose another --out folder"
                )
            if target in seen:
                raise DataError(f"{f} and {seen[target]} would both be written to {target}; rename one of them")
            if target.exists() and not overwrite and not ours:
                raise DataError(f"{target}: exists already; remove it, choose another --out folder, or pass --overwrite")
            seen[target] = f
            targets[spec.name] = target
        plan.append(targets)
        done.append(ours and all(t.exists() for t in targets.values()))
    return plan, done


def job_identity(model: str, inputs: Sequence[str], opts: PredictionOptions, specs: Sequence[OutputSpec]) -> dict[str, Any]:
    """What makes two prediction jobs the same (for resuming): the model, the inputs as given (a
    folder that grew is still the same job: its new files are predicted), the outputs and every
    option that changes them."""
    import dataclasses

    named = str(Path(model).resolve()) if Path(model).exists() else model
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("progress", "overwrite")}
    return {"model": named, "inputs": sorted(str(Path(i).resolve()) for i in inputs),
            "outputs": [s.name for s in specs], "options": options}


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
    record: bool = True,
    **settings: Any,
) -> list[dict[str, Path]]:
    """Predict every input (TIFF files, OME-Zarr stores) with ``model`` (a checkpoint file, an
    MLflow run id or a bioimage.io package).

    ``options`` (or the same names as keyword arguments: ``tile_size``, ``tta``, ``axes``,
    ``out_format``, ...; see :class:`~bioflow.inference.options.PredictionOptions`) say how; they
    are checked before any work. Every readable input is predicted even when others fail; the
    failures are reported one line each, and then raised together as a :class:`PredictionErrors`.
    Outputs are written under temporary names and renamed when complete, so a failed input leaves
    nothing behind under a final name; ``out`` is created only when there is something to write.
    The same call into the same ``out`` again resumes: inputs that are done are skipped, and
    OME-Zarr outputs continue at their first unfinished block.

    Started by ``torchrun`` or under SLURM with several tasks, the processes share out the inputs
    and the blocks of OME-Zarr outputs (see :mod:`bioflow.inference.distributed`); the outputs are
    the same as one process writes. With ``record`` the job is recorded as an MLflow run
    (:mod:`bioflow.tracking.predictions`).

    Returns, for each input predicted (or done before), the output files (by output name).
    """
    from bioflow.inference.distributed import Ranks

    if options is not None and settings:
        raise BioflowError(f"predict: give the options as one PredictionOptions or as keywords, not both ({', '.join(settings)})")
    opts = options if options is not None else PredictionOptions.of(**settings)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is not a folder; give a folder for the outputs")
    ranks = Ranks.detect()
    try:
        return _predict_job(model, inputs, out_dir, opts, ranks, project_dir, tracking_uri, record)
    finally:
        ranks.stop()


def _say(ranks, line: str, err: bool = False) -> None:
    if ranks.main:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def _predict_job(model, inputs, out_dir: Path, opts: PredictionOptions, ranks, project_dir, tracking_uri,
                 record: bool) -> list[dict[str, Path]]:
    import time

    from bioflow.inference.distributed import assign
    from bioflow.allocator import keep_freed_memory
    from bioflow.threads import fit_threads, local_processes
    from bioflow.loading import load_model
    from bioflow.tracking.predictions import NOT_RECORDED, start_record
    from bioflow.tracking.store import Store, default_project_dir

    started = time.perf_counter()
    device = ranks.start(choose_device(opts.device))
    fit_threads(processes=local_processes())  # this node's processes share its cores
    keep_freed_memory()
    files = ranks.gather(collect_inputs(inputs))[0]  # the first process's list (a folder may be growing)
    explicit = project_dir is not None or tracking_uri is not None
    store = Store.create(project_dir or default_project_dir(), tracking_uri).check_intact()
    loaded = load_model(model, store, inference=True, explicit_store=explicit)
    task = loaded.task
    for line in task.prediction_caveats():
        _say(ranks, f"bioflow: note: {line}", err=True)
    if opts.precision is not None:  # instead of the model's predict.precision
        if getattr(task, "context", None) is None:
            raise BioflowError(f"--precision: {model} does not predict through bioflow's network; predict without it")
        task.context.predict["precision"] = opts.precision
    request_outputs(task, opts)
    task.to(device)
    specs = outputs_of(task, opts.tta_spread)
    journal = Journal.open(out_dir, job_identity(model, inputs, opts, specs))
    journal.same, journal.choices = ranks.gather((journal.same, journal.choices))[0]  # as the first process read it
    if opts.overwrite:
        journal.same, journal.choices = False, {}
    opts = repeatable_options(task, opts, journal, ranks)
    plan, done = output_paths(files, out_dir, specs, opts.overwrite, opts.out_format, journal)
    results: dict[int, dict[str, Path]] = {i: plan[i] for i in range(len(files)) if done[i]}
    if results:
        _say(ranks, f"bioflow: {len(results)} of {len(files)} input(s) done in an earlier run of this command "
                    f"into {out_dir}; kept")
    if len(results) == len(files):
        return [plan[i] for i in sorted(results)]

    recorder = None
    fresh_folder, fresh_journal = not out_dir.exists(), not journal.same
    if ranks.main:
        journal.write()
        if record:
            recorder = start_record(store, explicit, loaded, model, out_dir, inputs, opts, ranks.world)
    try:
        record_id = ranks.gather(recorder.run_id if recorder else None)[0]

        # Inputs whose outputs are OME-Zarr stores of streamed outputs go block by block; others whole.
        failures: dict[int, str] = {}
        blocked: dict[int, BlockedFile] = {}
        setup_error = None
        for i, f in enumerate(files):
            if i in results:
                continue
            try:
                job = blocked_file(task, f, plan[i], opts, journal, record_id, loaded.run_id, model, create=ranks.main,
                                   resume=not fresh_journal)
            except BioflowError as exc:
                if len(files) == 1 and ranks.world == 1:
                    raise
                failures[i] = exc.one_line()
                _say(ranks, f"bioflow: error: {exc.one_line()}", err=True)
                continue
            except Exception as exc:  # e.g. a store that cannot be written
                setup_error = f"{f}: {type(exc).__name__}: {exc}"
                break
            if job is not None:
                blocked[i] = job
        setup_error = ranks.agree(setup_error)
        if setup_error:
            raise BioflowError(setup_error)
        ranks.barrier()  # the first process made the blocked outputs' stores; now all may open them
        opening = None
        for i, job in blocked.items():
            if not ranks.main:
                try:
                    job.open_writers()
                except Exception as exc:
                    opening = f"{files[i]}: {' '.join(str(exc).split())}"
                    break
        opening = ranks.agree(opening)
        if opening:
            raise BioflowError(opening)
        items: list[tuple[int, int | None, int]] = []  # (input, frame, block) or (input, None, 0) for a whole input
        costs: list[float] = []
        for i, f in enumerate(files):
            if i in results or i in failures:
                continue
            if i in blocked:
                for t, b in blocked[i].pending():
                    items.append((i, t, b))
                    costs.append(blocked[i].blocks[b].pixels)
            else:
                items.append((i, None, 0))
                costs.append(input_pixels(f, opts))
        # the first process's list (a process that is quick to finish a block must not change another's)
        items, costs = ranks.gather((items, costs))[0]
        owner = assign(costs, ranks.world)
        mine = [item for item, rank in zip(items, owner) if rank == ranks.rank]

        verdicts: dict[int, Any] = {}
        finished: dict[int, dict[str, Path]] = {}
        for i, t, b in mine:
            if i in failures:
                continue
            f = files[i]
            try:
                if t is None:
                    verdicts[i] = _predict_file(task, f, plan[i], out_dir, opts, record_id=record_id,
                                                model_run_id=loaded.run_id, model=model)
                    finished[i] = plan[i]
                    if ranks.world == 1:
                        print(f"bioflow: {f} -> {', '.join(str(p) for p in plan[i].values())}", flush=True)
                else:
                    verdict = blocked[i].predict(t, b)
                    if verdict is not None:
                        verdicts[i] = verdict
            except Exception as exc:
                if not isinstance(exc, BioflowError) and ranks.world == 1:
                    raise
                if not isinstance(exc, BioflowError):  # the other processes must not wait for this one forever
                    exc = BioflowError(f"{f}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
                failures[i] = exc.one_line()
                if len(files) == 1 and ranks.world == 1:
                    for job in blocked.values():
                        job.abort()  # bad data: nothing of it is kept (a killed job keeps its blocks)
                    raise
                print(f"bioflow: error: {exc.one_line()}", file=sys.stderr, flush=True)
        for job in blocked.values():
            job.release()

        gathered = ranks.gather((finished, failures, verdicts, len(mine)))
        for part_finished, part_failures, part_verdicts, _ in gathered:
            finished.update(part_finished)
            failures.update(part_failures)
            verdicts.update(part_verdicts)
        if ranks.world > 1:
            _say(ranks, f"bioflow: {ranks.world} processes shared {len(items)} pieces of work (inputs and blocks): "
                        + " + ".join(str(part[-1]) for part in gathered))
        if ranks.main:
            for i, job in blocked.items():
                if i in failures:  # bad data: nothing of it is kept (a killed job keeps its blocks)
                    job.abort()
                    continue
                try:
                    if job.gathered:  # all blocks' raw output through one session: one global NMS
                        job.check_done()
                        _predict_file(task, files[i], plan[i], out_dir, opts, record_id=record_id,
                                      model_run_id=loaded.run_id, model=model, replay=job.replay)
                    job.complete()
                except BioflowError as exc:
                    failures[i] = exc.one_line()
                    job.abort()
                    continue
                finished[i] = plan[i]
                print(f"bioflow: {files[i]} -> {', '.join(str(p) for p in plan[i].values())}", flush=True)
            if ranks.world > 1:
                for i in sorted(finished):
                    if i not in blocked:
                        print(f"bioflow: {files[i]} -> {', '.join(str(p) for p in plan[i].values())}", flush=True)
            fit_rows = []
            for i in sorted(verdicts):
                verdict = verdicts[i]
                if verdict is None or i not in finished:
                    continue
                fit_rows.append({"file": str(files[i]), **verdict})
                if not verdict["fits"]:
                    log.warning("%s does not look like the training data (score %.2f above %.2f; most unlike it: %s): "
                                "doubt its outputs", files[i], verdict["score"], verdict["threshold"], verdict["reason"])
            if fit_rows:
                write_fit_report(out_dir / FIT_REPORT, fit_rows)
            if recorder is None and record and finished:
                print(f"bioflow: note: {NOT_RECORDED}", file=sys.stderr, flush=True)
            if recorder is not None:
                rows = [{"input": str(files[i]), "outputs": " ".join(str(p) for p in plan[i].values()),
                         "status": "done" if i in finished else "earlier" if i in results else f"failed: {failures.get(i, '')}"}
                        for i in range(len(files))]
                pixels = sum(input_pixels(files[i], opts) for i in finished)
                recorder.finish(rows, pixels, time.perf_counter() - started, len(failures))
    except BaseException:
        if recorder is not None:
            recorder.fail()
        if ranks.main and fresh_journal and not any(p.exists() or (out_dir / f".{p.name}.partial").exists()
                                                    for targets in plan for p in targets.values()):
            forget(out_dir, fresh_folder)
        raise
    if ranks.main:
        if not finished and not results and fresh_journal and not any((out_dir / f".{p.name}.partial").exists()
                                                                      for i in blocked for p in plan[i].values()):
            forget(out_dir, fresh_folder)  # nothing was made: leave the folder as it was
    # every process ends with the same outcome
    failures = ranks.gather(failures)[0] if ranks.world > 1 else failures
    finished = ranks.gather(finished)[0] if ranks.world > 1 else finished
    if failures:
        if len(files) == 1:
            raise DataError(next(iter(failures.values())))
        raise PredictionErrors(list(failures.values()), len(files))
    results.update(finished)
    return [results[i] for i in sorted(results)]


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


def _predict_file(task, f: Path, targets: dict[str, Path], out_dir: Path, opts: PredictionOptions,
                  record_id: str | None = None, model_run_id: str | None = None, model: str = "", replay=None):
    """Predict one file (every time point of a time-lapse) into its outputs; returns how its first
    frame fits the model's training data (None for models without a fingerprint). With
    ``replay(t, sink)``, the raw output of each time point was predicted before (block by block,
    see :class:`bioflow.inference.blocks.BlockedFile`) and is only handed over again."""
    import torch

    from bioflow.inference.fit import FitObserver

    arrays, first = open_input(task, f, opts)
    options = opts.tiling()
    frames = arrays
    if replay is None:  # (replayed blocks were checked as they were read)
        check_compatible(task, arrays[0], f)
        for array in arrays[1:]:
            check_finite(array, str(f), when="prediction")
    factor = None if replay is not None else resolution_factor(task, first.pixel_size, f, opts.rescale)
    shape = tuple(arrays[0].shape[1:])
    out_dir.mkdir(parents=True, exist_ok=True)
    writers: dict[str, Any] = {}
    tables: dict[str, list] = {}  # per table output, one table per frame: written when all are done
    partials: list[Path] = []
    made_by = provenance(f, model, model_run_id, record_id)

    def writer(spec: OutputSpec):
        if spec.name not in writers:
            writers[spec.name] = make_writer(targets[spec.name], shape, spec, f, first, len(frames), made_by)
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
                stride = (spread_stride(task) if factor is None else ()) if opts.tta_spread else None
                sink = session_sink(session, writers, t, stride)
                watch = t == 0 and replay is None and getattr(task, "fit_reference", None) is not None
                with torch.no_grad(), (FitObserver(task) if watch else nullcontext()) as seen:
                    if replay is not None:  # raw output predicted before, block by block
                        replay(t, sink)
                    elif factor is None:
                        task.predict_array(array, sink=sink, **options)
                    else:
                        predict_rescaled(task, array, factor, sink, options)
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


def predict_array(task, array, options: PredictionOptions | None = None, check_fit: bool = False,
                  **tiling: Any) -> dict[str, Any]:
    """Every output of ``task`` (a predictor) for one channel-first image in memory, tiled like
    ``bioflow predict`` with ``options`` (or the tiler's options as keywords: ``tile_size``,
    ``overlap``, ``batch_size``, ``tta``, ``blend``, ``progress``). With ``check_fit``, and a
    model that has a fingerprint of its training data, also ``"fit"``: how the image fits it."""
    import torch

    from bioflow.allocator import keep_freed_memory
    from bioflow.inference.fit import FitObserver

    keep_freed_memory()
    if options is None:
        options = PredictionOptions.of(allowed=TILING, **{"progress": False, **tiling})
    options = options.tiling()

    check_compatible(task, array, Path("the image"))
    shape = tuple(array.shape[1:])
    session = task.prediction_session(shape)
    spread = bool(options.get("tta_spread"))
    writers = {spec.name: ArrayWriter(shape, spec) for spec in [*session.outputs, *([SPREAD] if spread else [])]
               if spec.streamed}
    tables = {spec.name for spec in session.outputs if spec.table}
    try:
        watch = check_fit and getattr(task, "fit_reference", None) is not None
        with torch.no_grad(), (FitObserver(task) if watch else nullcontext()) as seen:
            task.predict_array(array, sink=session_sink(session, writers, 0, spread_stride(task) if spread else None),
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


