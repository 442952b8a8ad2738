"""What a task produces when it predicts an image, strip by strip and at the end.

``bioflow predict`` streams an image through the network (see :mod:`bioflow.inference.tiling`) and
hands each finished strip of raw network output to the task's :class:`PredictionSession`, which
turns it into output blocks (e.g. a class map) that are written at once. Outputs that need the
whole image (instances after a post-processor, StarDist's polygons after non-maximum suppression)
are produced by :meth:`PredictionSession.finish` once all strips were seen; the session keeps
what it needs for that in temporary files, not in memory. ``finish`` may return such an output as
:class:`Blocks` (made strip by strip as it is written), so that not even the finished output has to
fit in memory.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from bioflow.conventions import Blocks, output_blocks  # noqa: F401 (part of this module's interface)


@dataclass
class OutputSpec:
    """One output image: name, channels (None: no channel axis), dtype, and whether it is streamed."""

    name: str
    channels: int | None
    dtype: Any
    streamed: bool = True
    #: A table (:mod:`bioflow.inference.objects`), not an image: ``finish`` returns a callable that
    #: gives it once the images are written; ``bioflow predict`` writes it as CSV.
    table: bool = False


class PredictionSession:
    """Turns strips of raw network output into outputs; the default streams one output.

    Parameters
    ----------
    outputs
        The outputs, the main one first.
    finalize
        Maps a raw strip ``(K, rows, ...)`` to ``{name: block}`` for the streamed outputs.
    """

    def __init__(self, outputs: Sequence[OutputSpec], finalize: Callable[[torch.Tensor], dict[str, np.ndarray]]) -> None:
        self.outputs = list(outputs)
        self._finalize = finalize

    def block(self, start: int, raw: torch.Tensor) -> dict[str, np.ndarray]:
        return self._finalize(raw)

    def finish(self) -> dict[str, np.ndarray]:
        return {}

    def close(self) -> None:
        """Remove temporary files (also after a failure)."""


class SpooledArray:
    """A float32 array written strip by strip into a temporary file, then read as a memory map."""

    def __init__(self, shape: Sequence[int], workdir: str | Path | None = None) -> None:
        from bioflow.data.rawfile import RawArrayFile

        fd, name = tempfile.mkstemp(prefix=".bioflow-", suffix=".raw", dir=workdir)
        os.close(fd)
        self.path = Path(name)
        self.shape = tuple(int(s) for s in shape)
        with open(self.path, "r+b") as fh:
            fh.truncate(int(np.prod(self.shape)) * 4)
        self._file = RawArrayFile(self.path, 0, self.shape, np.float32, writable=True)

    def write(self, start: Sequence[int], block: np.ndarray) -> None:
        self._file.write(start, block)

    def array(self) -> np.ndarray:
        self._file.close()
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=self.shape)

    def remove(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)
