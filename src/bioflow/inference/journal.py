"""What a prediction job has finished in its output folder, so that the same command resumes it.

The job writes its identity (the model, the inputs as given, and every option that changes the
outputs) to ``.prediction-job.json`` in the output folder before it writes anything else, with the
choices a resumption must repeat (the automatic tile size). Outputs appear
under their final names only when complete (they are renamed into place), so when the same
command runs again into that folder, an input whose outputs all exist is done and is skipped, and
its other outputs are the job's own, to be finished. Blocks of a large OME-Zarr output are marked
done one by one (an empty file each, in ``.<name>.blocks/``, made only after the block's data is
written), so a killed job loses at most the blocks it was writing. Partial outputs and block marks
are taken up only by the same job; another command (another model, other inputs or options) into
the same folder is refused where it would replace outputs, as before, and with ``--overwrite``
starts over.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOB_FILE = ".prediction-job.json"


@dataclass
class Journal:
    """A prediction job's record in its output folder."""

    out_dir: Path
    identity: dict[str, Any]
    same: bool  # the folder holds the outputs of a job with this identity
    #: Choices the job made that its resumption must make alike (e.g. the automatic tile size,
    #: which depends on the memory free when it starts), by name.
    choices: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, out_dir: Path, identity: dict[str, Any]) -> "Journal":
        path = out_dir / JOB_FILE
        earlier: dict[str, Any] = {}
        if path.is_file():
            try:
                earlier = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                earlier = {}
        identity = json.loads(json.dumps(identity))  # as it reads back
        same = isinstance(earlier, dict) and earlier.get("identity") == identity
        return cls(out_dir, identity, same, dict(earlier.get("choices") or {}) if same else {})

    def write(self) -> None:
        """Record the job (before any output is written), atomically."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        partial = self.out_dir / f"{JOB_FILE}.partial"
        record = {"identity": self.identity, "choices": self.choices}
        partial.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(partial, self.out_dir / JOB_FILE)
        self.same = True

    def _blocks(self, name: str) -> Path:
        return self.out_dir / f".{name}.blocks"

    def block_done(self, name: str, frame: int, index: int) -> bool:
        return (self._blocks(name) / f"{frame}-{index}").is_file()

    def mark_block(self, name: str, frame: int, index: int) -> None:
        folder = self._blocks(name)
        folder.mkdir(exist_ok=True)
        (folder / f"{frame}-{index}").touch()

    def clear_blocks(self, name: str) -> None:
        shutil.rmtree(self._blocks(name), ignore_errors=True)


def repeatable_options(task, opts, journal, ranks):
    """The options with the automatic tile size fixed: the first process's choice (it depends on
    the memory free when a process starts), or the one the resumed job made, so that every process
    and every resumption rounds alike."""
    import dataclasses

    from bioflow.inference.predictor import TiledPredictor

    if opts.tile_size is not None or not isinstance(task, TiledPredictor):
        return opts
    tile = journal.choices.get("tile_size")
    if tile is None:
        tile = ranks.gather([int(n) for n in task.tiling(None, opts.overlap, opts.batch_size)[0]])[0]
        journal.choices["tile_size"] = tile
    return dataclasses.replace(opts, tile_size=tuple(int(n) for n in tile))


def forget(out_dir: Path, fresh_folder: bool) -> None:
    """Remove the job's record (and the output folder, if this job made it and it is empty)."""
    (out_dir / JOB_FILE).unlink(missing_ok=True)
    if fresh_folder:
        try:
            out_dir.rmdir()
        except OSError:
            pass
