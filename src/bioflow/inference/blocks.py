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
    """An input predicted block by block into OME-Zarr outputs (see :mod:`bioflow.inference.blocks`)."""

    def __init__(self, task, f: Path, targets: dict[str, Path], opts: PredictionOptions, journal, arrays, first,
                 provenance: dict[str, Any]) -> None:
        from bioflow.inference.blocks import block_shape, plan_blocks
        from bioflow.inference.tiling import context_margin

        self.task, self.f, self.targets, self.opts, self.journal = task, f, targets, opts, journal
        self.arrays, self.first, self.provenance = arrays, first, provenance
        self.shape = tuple(int(n) for n in arrays[0].shape[1:])
        self.specs = [*task.prediction_outputs(), *([SPREAD] if opts.tta_spread else [])]
        from bioflow.data.omezarr import output_chunks

        given, _ = zarr_layout(f, first)
        self.key = targets[self.specs[0].name].name
        self.writers: dict[str, Any] = {}
        self.chunks = output_chunks("".join(a for a in "ZYX" if a in first.file_axes.upper()), self.shape, given)
        self.blocks = plan_blocks(self.shape, block_shape(self.shape, self.chunks, opts.block_size))
        self.halo = context_margin(task.receptive_field())
        self._norms: dict[int, Any] = {}

    def open_writers(self, create: bool = False) -> None:
        """Open (the first process: create, or reopen to resume) the partial stores of the outputs."""
        fresh = False
        for spec in self.specs:
            writer = make_writer(self.targets[spec.name], self.shape, spec, self.f, self.first, len(self.arrays),
                                  self.provenance, resume=True)
            fresh = fresh or not writer.resumed
            self.writers[spec.name] = writer
        if fresh:
            if not create:
                raise BioflowError(f"{self.f}: the partial outputs changed while the job ran; run the command again")
            self.journal.clear_blocks(self.key)

    def pending(self) -> list[tuple[int, int]]:
        return [(t, b) for t in range(len(self.arrays)) for b in range(len(self.blocks))
                if not self.journal.block_done(self.key, t, b)]

    def predict(self, t: int, b: int):
        """Predict block ``b`` of time point ``t``, write it, mark it done; the fit of the image
        (judged on its first block) or None."""
        import torch

        from bioflow.data.views import SubArray
        from bioflow.inference.blocks import view_box
        from bioflow.inference.fit import FitObserver

        array = self.arrays[t]
        if t not in self._norms:
            self._norms[t] = self.task.normalizer().norm_for(array)
        block = self.blocks[b]
        lo, hi = view_box(block, self.shape, self.halo, int(getattr(self.task, "size_multiple", 1)))
        view = np.asarray(SubArray(array, [None] + [slice(a, z) for a, z in zip(lo, hi)])[...])
        check_finite(view, str(self.f), when="prediction")
        shape = tuple(view.shape[1:])
        session = self.task.prediction_session(shape)
        buffers = {spec.name: ArrayWriter(shape, spec) for spec in self.specs}
        options = {**self.opts.tiling(), "progress": False}
        watch = t == 0 and b == 0 and getattr(self.task, "fit_reference", None) is not None
        try:
            with torch.no_grad(), (FitObserver(self.task) if watch else nullcontext()) as seen:
                self.task.predict_array(view, sink=session_sink(session, buffers, 0, () if self.opts.tta_spread else None),
                                        norm=self._norms[t], **options)
            session.finish()
        finally:
            session.close()
        inner = tuple(slice(s - a, s - a + n) for s, a, n in zip(block.start, lo, block.size))
        for spec in self.specs:
            data = buffers[spec.name].array
            data = data[(slice(None),) + inner] if spec.channels is not None else data[inner]
            self.writers[spec.name].write_box(block.start, data, frame=t)
        self.journal.mark_block(self.key, t, b)
        return seen.verdict() if watch else None

    def release(self) -> None:
        self.writers = {}

    def abort(self) -> None:
        """Remove the partial outputs and the record of their blocks."""
        from bioflow.data.omezarr import ZarrWriter

        for target in self.targets.values():
            ZarrWriter.remove_partial(target)
        self.writers = {}
        self.journal.clear_blocks(self.key)

    def complete(self) -> None:
        """Rename the outputs into place once every block is done (the first process, at the end)."""
        missing = self.pending()
        if missing:
            raise BioflowError(f"{self.f}: {len(missing)} block(s) were not predicted; run the command again to finish")
        self.open_writers()
        for writer in self.writers.values():
            writer.close()
        self.writers = {}
        self.journal.clear_blocks(self.key)


def blocked_file(task, f: Path, targets: dict[str, Path], opts: PredictionOptions, journal, record_id, model_run_id,
                  model: str, create: bool):
    """The input as a :class:`BlockedFile` if it is predicted block by block: OME-Zarr outputs,
    all streamed, of a bioflow network at the image's own pixel size; else None."""
    from bioflow.inference.predictor import TiledPredictor

    if not all(t.name.endswith(".ome.zarr") for t in targets.values()):
        return None
    if not isinstance(task, TiledPredictor) or spread_stride(task) and any(int(g) > 1 for g in spread_stride(task)):
        return None
    if not all(spec.streamed and not spec.table for spec in task.prediction_outputs()):
        return None
    arrays, first = open_input(task, f, opts)
    check_shape(task, arrays[0], f)
    if resolution_factor(task, first.pixel_size, f, opts.rescale, warn=create) is not None:
        return None
    job = BlockedFile(task, f, targets, opts, journal, arrays, first,
                       provenance(f, model, model_run_id, record_id))
    if create:
        job.open_writers(create=True)
    return job
