"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def project_dir(tmp_path_factory) -> Path:
    """One project folder (one MLflow sqlite store) shared by the CLI tests of a session."""
    return tmp_path_factory.mktemp("project")
