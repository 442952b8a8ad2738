"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def project_dir(tmp_path_factory) -> Path:
    """One project folder (one MLflow sqlite store) shared by the CLI tests of a session."""
    return tmp_path_factory.mktemp("project")


def pytest_addoption(parser) -> None:
    parser.addoption("--slow", action="store_true", default=False, help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``slow`` run only with ``--slow`` (or when ``-m`` selects them)."""
    if config.getoption("--slow") or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
