"""Large images predicted block by block: chunk-aligned boxes, each from its own view with a halo.

An OME-Zarr output is cut into blocks that are unions of whole chunks of the output store (about
:data:`BLOCK_TARGET` pixels a side), so that a block is written by one process without touching
a chunk another block writes: blocks can go to different processes and nodes, and a prediction
killed half-way resumes at the first block it had not finished. Each block is predicted from a
view of the image that reaches ``halo`` pixels further on every side (the network's context,
its start aligned to the network's size multiple), so its pixels see their whole receptive field
and come out as the whole-image prediction would give them, up to float rounding. The blocks
depend on the image and the output's chunks only, never on the number of processes: one process
and many write the same bytes.
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bioflow.data.records import check_finite
from bioflow.data.output_files import make_writer, provenance, zarr_layout
from bioflow.errors import BioflowError
from bioflow.inference.options import PredictionOptions
from bioflow.inference.streams import (SPREAD, ArrayWriter, check_shape, open_input, resolution_factor, session_sink,
                                       spread_stride)

#: Block edge per spatial axis that blocks grow to (in whole chunks): 2D, and 3D (Z, Y, X).
BLOCK_TARGET = {2: (2048, 2048), 3: (64, 256, 256)}


@dataclass(frozen=True)
class Block:
    """One box of the output: its first pixel and its size per spatial axis."""

    start: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def pixels(self) -> int:
        return int(math.prod(self.size))


def block_shape(shape: Sequence[int], chunks: Sequence[int], wanted: Sequence[int] | None = None) -> tuple[int, ...]:
    """The block edge per axis: ``wanted`` (default :data:`BLOCK_TARGET`) rounded up to whole chunks."""
    target = list(wanted) if wanted is not None else list(BLOCK_TARGET.get(len(shape), (256,) * len(shape)))
    if len(target) == 1:
        target = target * len(shape)
    return tuple(min(int(n), int(c) * max(1, math.ceil(int(t) / int(c)))) for n, c, t in zip(shape, chunks, target))


def plan_blocks(shape: Sequence[int], edge: Sequence[int]) -> list[Block]:
    """The blocks that tile ``shape`` (the last ones along an axis may be smaller), in C order."""
    starts = [range(0, int(n), int(e)) for n, e in zip(shape, edge)]
    return [Block(tuple(s), tuple(min(int(e), int(n) - int(x)) for x, e, n in zip(s, edge, shape)))
            for s in itertools.product(*starts)]


def view_box(block: Block, shape: Sequence[int], halo: int, multiple: int) -> tuple[list[int], list[int]]:
    """The part of the image a block is predicted from: ``halo`` more on every side, its start a
    multiple of ``multiple`` (so pooling windows line up as in the whole image), within the image."""
    lo = [max(0, (s - halo) // multiple * multiple) for s in block.start]
    hi = [min(int(n), s + z + halo) for s, z, n in zip(block.start, block.size, shape)]
    return lo, hi


class BlockedFile:
    """An input predicted block by block into OME-Zarr outputs.

    Outputs made strip by strip (``streamed``: a class map, a restored image) are written block by
    block straight into their stores. Outputs that need the whole image first (StarDist's labels
    after its global NMS, a post-processor's instances) are *gathered*: the blocks' raw network
    output is spooled into a hidden zarr array beside the outputs (on the output grid, one chunk
    per block), and when every block is done the first process replays it strip by strip through
    the task's prediction session, exactly as a single process predicting the whole image would
    hand it over; so every process's candidates meet in one global NMS.
    """

    def __init__(self, task, f: Path, targets: dict[str, Path], opts: PredictionOptions, journal, arrays, first,
                 provenance: dict[str, Any], resume: bool = True) -> None:
        from bioflow.data.omezarr import output_chunks
        from bioflow.inference.tiling import context_margin

        self.task, self.f, self.targets, self.opts, self.journal = task, f, targets, opts, journal
        self.arrays, self.first, self.provenance = arrays, first, provenance
        self.shape = tuple(int(n) for n in arrays[0].shape[1:])
        outputs = task.prediction_outputs()
        self.gathered = not all(spec.streamed and not spec.table for spec in outputs)
        self.specs = [*outputs, *([SPREAD] if opts.tta_spread else [])]
        self.resume = resume  # partial outputs of an earlier run of the same job may be taken up
        if opts.block_size is not None and len(opts.block_size) not in (1, len(self.shape)):
            from bioflow.errors import ConfigError

            raise ConfigError(f"--block-size {' '.join(map(str, opts.block_size))}: one value or one per spatial axis "
                              f"({len(self.shape)} for {f})")
        given, _ = zarr_layout(f, first)
        self.key = targets[self.specs[0].name].name
        self.writers: dict[str, Any] = {}
        self.chunks = output_chunks("".join(a for a in "ZYX" if a in first.file_axes.upper()), self.shape, given)
        edge = block_shape(self.shape, self.chunks, opts.block_size)
        self.stride = tuple(int(g) for g in spread_stride(task)) or (1,) * len(self.shape)
        self.multiple = int(getattr(task, "size_multiple", 1))
        if self.gathered:  # blocks start on the output grid; the spool has one chunk per block
            edge = tuple(-(-e // g) * g for e, g in zip(edge, self.stride))
            self.multiple = math.lcm(self.multiple, *self.stride)
        self.edge = edge
        self.blocks = plan_blocks(self.shape, edge)
        self.grid = tuple(-(-n // g) for n, g in zip(self.shape, self.stride))
        self.halo = context_margin(task.receptive_field())
        self.spool_path = journal.out_dir / f".{self.key}.raw.partial"
        self.spool = None
        self._norms: dict[int, Any] = {}

    def open_writers(self, create: bool = False) -> None:
        """Open (the first process: create, or reopen to resume) the partial stores of the outputs
        (of a gathered input: its spool of raw output)."""
        if create and not self.resume:  # another job's (or an --overwrite's) pieces are never taken up
            self.abort()
        if self.gathered:
            fresh = self._open_spool(create)
        else:
            fresh = False
            for spec in self.specs:
                writer = make_writer(self.targets[spec.name], self.shape, spec, self.f, self.first, len(self.arrays),
                                     self.provenance, resume=True, create=create)
                fresh = fresh or not writer.resumed
                self.writers[spec.name] = writer
        if fresh:
            if not create:
                raise BioflowError(f"{self.f}: the partial outputs changed while the job ran; run the command again")
            self.journal.clear_blocks(self.key)

    def _open_spool(self, create: bool) -> bool:
        """Open the spool of raw output (creating it, the first process only); whether it is new."""
        import shutil

        import zarr

        chunks = (1, None) + tuple(e // g for e, g in zip(self.edge, self.stride))
        if self.spool_path.is_dir():
            try:
                spool = zarr.open_array(str(self.spool_path), mode="r+")
                if spool.shape[0] == len(self.arrays) and tuple(spool.shape[2:]) == self.grid \
                        and tuple(spool.chunks[2:]) == chunks[2:]:
                    self.spool = spool
                    return False
            except Exception:
                pass
            if not create:
                return True
            shutil.rmtree(self.spool_path)
        if not create:
            return True
        channels = self._raw_channels()
        self.spool = zarr.open_array(str(self.spool_path), mode="w", shape=(len(self.arrays), channels) + self.grid,
                                     chunks=(1, channels) + chunks[2:], dtype=np.float32, zarr_format=3)
        return True

    def _raw_channels(self) -> int:
        """How many channels of raw output the network gives (with the TTA spread, if asked), from a
        small probe image."""
        import torch

        probe = np.random.default_rng(0).random((self.arrays[0].shape[0],) + (2 * self.multiple,) * len(self.shape))
        seen: list[int] = []
        with torch.no_grad():
            self.task.predict_array(probe.astype(np.float32), sink=lambda start, raw: seen.append(int(raw.shape[0])),
                                    **{**self.opts.tiling(), "progress": False})
        return seen[0]

    def pending(self) -> list[tuple[int, int]]:
        return [(t, b) for t in range(len(self.arrays)) for b in range(len(self.blocks))
                if not self.journal.block_done(self.key, t, b)]

    def predict(self, t: int, b: int):
        """Predict block ``b`` of time point ``t``, write it, mark it done; the fit of the image
        (judged on its first block) or None."""
        import torch

        from bioflow.data.views import SubArray
        from bioflow.inference.fit import FitObserver

        array = self.arrays[t]
        if t not in self._norms:
            self._norms[t] = self.task.normalizer().norm_for(array)
        block = self.blocks[b]
        lo, hi = view_box(block, self.shape, self.halo, self.multiple)
        view = np.asarray(SubArray(array, [None] + [slice(a, z) for a, z in zip(lo, hi)])[...])
        check_finite(view, str(self.f), when="prediction")
        shape = tuple(view.shape[1:])
        options = {**self.opts.tiling(), "progress": False}
        watch = t == 0 and b == 0 and getattr(self.task, "fit_reference", None) is not None
        session, buffers, raw = None, {}, []
        if self.gathered:
            def sink(start, block_raw):
                raw.append(block_raw.float().cpu().numpy())
        else:
            session = self.task.prediction_session(shape)
            buffers = {spec.name: ArrayWriter(shape, spec) for spec in self.specs}
            sink = session_sink(session, buffers, 0, () if self.opts.tta_spread else None)
        try:
            with torch.no_grad(), (FitObserver(self.task) if watch else nullcontext()) as seen:
                self.task.predict_array(view, sink=sink, norm=self._norms[t], **options)
            if session is not None:
                session.finish()
        finally:
            if session is not None:
                session.close()
        if self.gathered:
            data = np.concatenate(raw, axis=1)
            first = [(s - a) // g for s, a, g in zip(block.start, lo, self.stride)]
            cells = [-(-(s + n) // g) - s // g for s, n, g in zip(block.start, block.size, self.stride)]
            inner = tuple(slice(c, c + n) for c, n in zip(first, cells))
            at = tuple(slice(s // g, s // g + n) for s, g, n in zip(block.start, self.stride, cells))
            self.spool[(t, slice(None)) + at] = data[(slice(None),) + inner]
        else:
            inner = tuple(slice(s - a, s - a + n) for s, a, n in zip(block.start, lo, block.size))
            for spec in self.specs:
                data = buffers[spec.name].array
                data = data[(slice(None),) + inner] if spec.channels is not None else data[inner]
                self.writers[spec.name].write_box(block.start, data, frame=t)
        self.journal.mark_block(self.key, t, b)
        return seen.verdict() if watch else None

    def replay(self, t: int, sink) -> None:
        """Hand the spooled raw output of time point ``t`` to ``sink`` strip by strip, as the
        tiler hands it over when it predicts the whole image."""
        import torch

        row = int(np.prod(self.spool.shape[1:])) // max(1, self.spool.shape[2])
        step = max(1, (1 << 22) // max(1, row))
        for start in range(0, self.grid[0], step):
            sink(start, torch.from_numpy(np.ascontiguousarray(self.spool[t, :, start:start + step])))

    def release(self) -> None:
        self.writers = {}

    def abort(self) -> None:
        """Remove the partial outputs and the record of their blocks."""
        import shutil

        from bioflow.data.omezarr import ZarrWriter

        for target in self.targets.values():
            ZarrWriter.remove_partial(target)
        shutil.rmtree(self.spool_path, ignore_errors=True)
        self.writers, self.spool = {}, None
        self.journal.clear_blocks(self.key)

    def check_done(self) -> None:
        missing = self.pending()
        if missing:
            raise BioflowError(f"{self.f}: {len(missing)} block(s) were not predicted; run the command again to finish")

    def complete(self) -> None:
        """Rename the outputs into place once every block is done (the first process, at the end;
        a gathered input's outputs are made from its spool first, see :meth:`replay`)."""
        self.check_done()
        if not self.gathered:
            self.open_writers()
            for writer in self.writers.values():
                writer.close()
        self.writers = {}
        self.abort_spool_and_marks()

    def abort_spool_and_marks(self) -> None:
        import shutil

        shutil.rmtree(self.spool_path, ignore_errors=True)
        self.spool = None
        self.journal.clear_blocks(self.key)


def blocked_file(task, f: Path, targets: dict[str, Path], opts: PredictionOptions, journal, record_id, model_run_id,
                 model: str, create: bool, resume: bool = True):
    """The input as a :class:`BlockedFile` if it is predicted block by block: OME-Zarr outputs of a
    bioflow network at the image's own pixel size; else None."""
    from bioflow.inference.predictor import TiledPredictor

    if not all(t.name.endswith(".ome.zarr") for t in targets.values() if not t.name.endswith(".csv")):
        return None
    if not isinstance(task, TiledPredictor):
        return None
    streamed = all(spec.streamed and not spec.table for spec in task.prediction_outputs())
    if streamed and any(int(g) > 1 for g in spread_stride(task)):
        return None
    arrays, first = open_input(task, f, opts)
    check_shape(task, arrays[0], f)
    if resolution_factor(task, first.pixel_size, f, opts.rescale, warn=create) is not None:
        return None
    job = BlockedFile(task, f, targets, opts, journal, arrays, first, provenance(f, model, model_run_id, record_id),
                      resume=resume)
    if create:
        job.open_writers(create=True)
    return job
