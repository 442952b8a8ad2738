"""What the predict widget offers as models: the trained runs of a project's MLflow store.

No Qt here: the widgets call these, and the tests call them directly.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from bioflow.errors import BioflowError

#: The experiment that records prediction jobs (not models).
PREDICTIONS_EXPERIMENT = "predictions"


@dataclass(frozen=True)
class RunChoice:
    """One trained model of a store, as the predict widget lists it."""

    run_id: str
    experiment: str
    name: str
    task: str
    score_name: str | None
    score: float | None
    started: str

    @property
    def label(self) -> str:
        score = "no test score" if self.score is None else f"{self.score_name.removeprefix('test/')} {self.score:.3f}"
        return f"{self.experiment} / {self.name} ({self.task}, {score}, {self.started}, {self.run_id[:8]})"


def headline(task: str, metrics: dict[str, float]) -> tuple[str | None, float | None]:
    """The run's main test score: its task's first headline metric, else its first test metric."""
    try:
        from bioflow.tasks import get_task

        preferred = list(get_task(task).headline_metrics)
    except Exception:  # a plugin task that is not installed here: its runs are still listed
        preferred = []
    for name in [*preferred, *sorted(k for k in metrics if k.startswith("test/") and k != "test/loss")]:
        if name in metrics:
            return name, float(metrics[name])
    return None, None


def list_runs(project_dir: str | Path, tracking_uri: str | None = None) -> list[RunChoice]:
    """Finished training runs with a model in the store, newest first; an empty list when the
    project has no store yet (nothing is created)."""
    from bioflow.tracking.store import Store

    store = Store.create(project_dir, tracking_uri).check_intact()
    if store.embedded and not (store.project_dir / "mlflow.db").is_file():
        return []
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(store.tracking_uri)
        experiments = [e for e in client.search_experiments() if e.name != PREDICTIONS_EXPERIMENT]
        names = {e.experiment_id: e.name for e in experiments}
        runs = client.search_runs(list(names), filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=500) if names else []
    except Exception as exc:  # a damaged or unreachable store: one line for the viewer
        raise BioflowError(f"{store.tracking_uri}: cannot list its runs ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    choices = []
    for run in runs:
        task = run.data.tags.get("bioflow.task")
        if not task:
            continue  # not a bioflow training run
        score_name, score = headline(task, run.data.metrics)
        started = datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        choices.append(RunChoice(run.info.run_id, names[run.info.experiment_id], run.info.run_name or run.info.run_id[:8],
                                 task, score_name, score, started))
    return choices


# -- what the train widget offers ------------------------------------------------------------------
def task_names() -> list[str]:
    """Every task of the registry: the built-ins and those of installed plugin packages."""
    from bioflow.registry import registry

    return registry.names("tasks")


def experiments() -> dict[str, str | None]:
    """Experiment configs (bioflow's and installed plugins') and the task each chooses (None:
    the default task)."""
    from importlib import resources

    import yaml

    from bioflow.config import CONFIG_PACKAGE
    from bioflow.registry import registry

    packages = [CONFIG_PACKAGE, *(c.target for c in registry.components("configs") if c.target != CONFIG_PACKAGE)]
    found: dict[str, str | None] = {}
    for package in packages:
        try:
            folder = resources.files(package) / "experiment"
            entries = sorted(folder.iterdir(), key=lambda e: e.name) if folder.is_dir() else []
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if not entry.name.endswith(".yaml"):
                continue
            try:
                content = yaml.safe_load(entry.read_text()) or {}
            except yaml.YAMLError:
                continue
            task = None
            for item in content.get("defaults") or []:
                if isinstance(item, dict):
                    for key, value in item.items():
                        if key.replace("override", "").strip().lstrip("/") == "task":
                            task = str(value)
            found.setdefault(entry.name[:-5], task)
    return found


def experiments_for(task: str, default_task: str = "segmentation") -> list[str]:
    """The experiments that train ``task``."""
    return [name for name, chosen in experiments().items() if (chosen or default_task) == task]
