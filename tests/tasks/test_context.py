"""Tasks read what they use of the training config from one explicit context, not from its sections."""

from __future__ import annotations

import re

from bioflow.tasks import create_task
from bioflow.tasks.context import TaskContext
from bioflow.testing import compose_config
from tests.helpers import REPO

INFO = {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": {}}


def test_the_context_holds_the_sections_a_task_uses():
    config = compose_config("task=n2v", "model.depth=1", "model.base_channels=4", "seed=7", "predict.tile_size=[96]",
                            "logger.figures.n_samples=3")
    context = TaskContext.from_config(config)
    assert context.name == "n2v" and context.model["depth"] == 1 and context.loss["name"] == "masked_mse"
    assert context.seed == 7 and context.predict["tile_size"] == [96] and context.figure_samples == 3
    assert context.batch_transform["name"] == "n2v" and context.postprocessor is None
    assert context.normalize == config["data"]["normalize"] and context.optimizer == config["optimizer"]
    task = create_task(config, INFO)
    assert task.context == context and task.tiling()[0] == [96, 96]


def test_no_task_module_reaches_into_the_config():
    """Only the context reads the config's sections (checkpoints still save the whole config)."""
    allowed = {"context.py", "__init__.py"}
    for path in sorted((REPO / "src" / "bioflow" / "tasks").glob("*.py")):
        if path.name in allowed:
            continue
        text = path.read_text().replace("used_components(self.config)", "")  # the checkpoint's record
        reads = re.findall(r"\bconfig\[|\bconfig\.get\(|self\.config\b(?! = config)", text)
        assert not reads, f"{path.name} reads the config directly: use self.context ({reads})"
    predictor = (REPO / "src" / "bioflow" / "inference" / "predictor.py").read_text()
    assert "self.config" not in predictor
