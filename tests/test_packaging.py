"""The package list in pyproject.toml covers every package of the source tree."""

from __future__ import annotations

import tomllib

from tests.helpers import REPO


def test_every_package_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO / "src").parts)
        for init in (REPO / "src").rglob("__init__.py")
    }
    found.add("bioflow.configs")  # the top-level configs/ folder, mapped into the package
    assert found == listed


def test_entry_points_point_to_existing_objects():
    from importlib.metadata import entry_points

    for group in ("bioflow.models", "bioflow.losses", "bioflow.samplers", "bioflow.postprocessors",
                  "bioflow.batch_transforms", "bioflow.sources"):
        for ep in entry_points(group=group):
            if ep.dist is not None and ep.dist.name == "bioflow":
                assert ep.load() is not None, ep
