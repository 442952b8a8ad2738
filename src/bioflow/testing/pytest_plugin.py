"""bioflow's pytest plugin (loaded automatically when bioflow is installed).

It parametrises any test that takes the ``bioflow_component`` argument over registered
components, as ``(kind, qualified name)`` pairs. By default every installed component is covered;
a plugin package limits it to its own components in its pytest configuration::

    [tool.pytest.ini_options]
    bioflow_distributions = ["my-lab-models"]
"""

from __future__ import annotations


def pytest_addoption(parser) -> None:
    parser.addini(
        "bioflow_distributions", type="args", default=[],
        help="distributions whose components the bioflow_component argument covers (default: all installed)",
    )


def pytest_generate_tests(metafunc) -> None:
    if "bioflow_component" not in metafunc.fixturenames:
        return
    from bioflow.testing import registered

    distributions = metafunc.config.getini("bioflow_distributions") or [None]
    params = sorted({p for d in distributions for p in registered(d)})
    metafunc.parametrize("bioflow_component", params, ids=[f"{kind}/{name}" for kind, name in params])
