"""Every config key that bioflow's messages, defaults or docs tell a user to set exists and composes.

The keys are collected from the source (error messages and comments) and from docs/ by pattern
(``data.allow_empty_masks=true``, ``task.prob_thresh=...``), then looked up in the configs a user
would have at hand (the default config, each task, the own-data experiments, the other options
of the groups that bring their own keys).
"""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from bioflow.config import _compose_node
from tests.helpers import REPO

SECTIONS = ("data", "model", "task", "trainer", "logger", "predict", "optimizer", "scheduler", "sampler",
            "checkpoint", "loss", "postprocessor", "batch_transform")
# a key followed by "=" (``data.allow_empty_masks=true``) or closing a code span (`` `data.normalize.mode` ``)
KEY = re.compile(r"(?<![\w./+-])((?:%s)(?:\.[a-z_]+)+)(?==|`)" % "|".join(SECTIONS))
TOP_LEVEL = re.compile(r"(?<![\w./+-])(init_from|resume|seed|project_dir|test_after_training)(?==|`)")

#: Configs a user could be in when following a piece of advice.
CONTEXTS = [
    [], ["task=stardist"], ["task=n2v"], ["task=care"], ["experiment=stardist_own_data"], ["experiment=n2v_own_data"],
    ["data=tiff_folder"], ["data=tiff_pairs"], ["data=tiff_images"], ["data=synthetic_restoration"], ["data=ome_zarr"],
    ["sampler=foreground"], ["sampler=class_weighted"],
    ["scheduler=plateau"], ["scheduler=cosine"], ["scheduler=onecycle"], ["batch_transform=structn2v", "task=n2v"],
    ["postprocessor=connected_components"], ["trainer=ddp"], ["trainer=multinode"], ["optimizer=sgd"],
    ["task=field_classifier"],  # the example plugin's task (docs/writing-a-task.md), installed with the test set-up
]


def advised_keys() -> dict[str, str]:
    """Key -> where it was advised (first place)."""
    found: dict[str, str] = {}
    sources = sorted((REPO / "src" / "bioflow").rglob("*.py")) + sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
    sources += sorted((REPO / "configs").rglob("*.yaml"))
    for path in sources:
        text = path.read_text()
        for pattern in (KEY, TOP_LEVEL):
            for match in pattern.finditer(text):
                code_span = text[match.end(1):match.end(1) + 1] == "`"
                # in Python sources ``double backticks`` name code objects; there only "key=" is advice
                if code_span and (path.suffix == ".py" or match.group(1).endswith((".zip", ".yaml", ".tif"))):
                    continue
                found.setdefault(match.group(1), str(path.relative_to(REPO)))
    return found


@pytest.fixture(scope="module")
def composed() -> list:
    return [_compose_node(overrides) for overrides in CONTEXTS]


def test_enough_advice_is_found():
    keys = advised_keys()
    assert len(keys) >= 40
    assert {"data.allow_empty_masks", "data.min_foreground", "data.normalize.mode", "init_from"} <= set(keys)


def has_key(cfg, key: str) -> bool:
    """Whether ``key`` is in the config (a mandatory ``???`` value counts: the user sets it)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    return node is not None and OmegaConf.is_dict(node) and leaf in node.keys()


@pytest.mark.parametrize("key", sorted(advised_keys()))
def test_advised_key_exists(key, composed):
    assert any(has_key(cfg, key) for cfg in composed), f"{key} (advised in {advised_keys()[key]}) is no config key"
