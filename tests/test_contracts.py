"""Every registered component, built-in or installed, passes the contract of its kind."""

from __future__ import annotations

from bioflow.testing import check_component


def test_contract(bioflow_component):
    check_component(*bioflow_component)
