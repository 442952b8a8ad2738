"""bioflow's import graph runs one way: no cycles, and no layer imports one above it.

Every import statement of every module is read from the source (top level and inside functions
alike), so a lazy import that goes upward counts as much as an eager one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "src" / "bioflow"

#: Layers from the bottom up; a module may import its own layer and the ones below.
LAYERS = [
    {"bioflow.version", "bioflow.errors", "bioflow.kinds", "bioflow.registry", "bioflow.arguments", "bioflow.conventions",
     "bioflow.quiet", "bioflow.threads", "bioflow.allocator"},
    {"bioflow.config"},
    {"bioflow.models", "bioflow.losses", "bioflow.samplers", "bioflow.transforms", "bioflow.postprocessors",
     "bioflow.metrics", "bioflow.stardist", "bioflow.optim", "bioflow.precision"},
    {"bioflow.data"},
    {"bioflow.inference", "bioflow.checkpoint"},
    {"bioflow.tasks"},
    # config validation and resuming (parts of the training job), tracking, and reading a model:
    # checkpoints, runs and bioimage.io packages (one resolver, bioflow.loading)
    {"bioflow.training.validation", "bioflow.training.resume", "bioflow.tracking", "bioflow.loading",
     "bioflow.bioimageio.package", "bioflow.bioimageio.runtime"},
    # the jobs: training, prediction, evaluation, export; the test kit
    {"bioflow.training", "bioflow.prediction", "bioflow.evaluation", "bioflow.bioimageio", "bioflow.testing"},
    # the root package is the Python API's facade (its lazy __getattr__ imports bioflow.api)
    {"bioflow.api", "bioflow.cli", "bioflow.__main__", "bioflow"},
    # the napari plugin (optional extra): widgets over the Python API
    {"bioflow.napari"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bioflow")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("bioflow"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if "configs" not in p.parts}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path, name):
            while imported and imported not in modules:  # `from bioflow.x import y` names a module or an object
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def layer_of(module: str) -> int:
    best = None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or (prefix != "bioflow" and module.startswith(prefix + ".")):  # the root: itself only
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def test_no_import_cycles():
    edges = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(graph()))
def test_no_upward_imports(module):
    upward = sorted(t for t in graph()[module] if layer_of(t) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports {upward} from above"


def test_components_and_data_never_reach_tasks_cli_tracking_or_training():
    edges = graph()
    forbidden = ("bioflow.tasks", "bioflow.cli", "bioflow.tracking", "bioflow.training")
    for module, targets in edges.items():
        if layer_of(module) <= layer_of("bioflow.data"):
            bad = [t for t in targets if t.startswith(forbidden)]
            assert not bad, f"{module} imports {bad}"


def test_model_exchange_knows_no_task_by_name():
    """What a method contributes to a package comes from its task's exchange hooks, so the
    exchange code names no task: a plugin's task exports like a built-in."""
    import re

    from bioflow.registry import registry

    names = {c.name for c in registry.components("tasks")} | {"segmentation", "stardist", "stardist3d", "care", "n2v"}
    for path in sorted((PACKAGE / "bioimageio").glob("*.py")):
        quoted = set(re.findall(r"""["']([A-Za-z0-9_]+)["']""", path.read_text()))
        assert not quoted & names, f"{path.name} names the task(s) {sorted(quoted & names)}"


def test_no_module_is_over_550_lines():
    long = {p.relative_to(PACKAGE).as_posix(): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 550}
    assert not long, f"modules over 550 lines (split them by concern): {long}"
