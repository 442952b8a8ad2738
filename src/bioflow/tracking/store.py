"""Where runs are stored: the project folder, the embedded MLflow store, or a tracking server.

The embedded default keeps everything under one project folder, at absolute paths, so that runs
started from any working directory land in the same place::

    <project_dir>/mlflow.db      the MLflow store (sqlite)
    <project_dir>/artifacts/     run artifacts (checkpoints, figures, configs)
    <project_dir>/outputs/       one folder per training job (Hydra output, local checkpoints)

Setting ``logger.tracking_uri`` (e.g. ``http://mlflow.example.org:5000``) sends runs to a tracking
server instead; the server then decides where artifacts go.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bioflow.errors import BioflowError


@dataclass(frozen=True)
class Store:
    """The tracking location of a project."""

    project_dir: Path
    server_uri: str | None = None

    @classmethod
    def create(cls, project_dir: str | Path, tracking_uri: str | None = None) -> "Store":
        return cls(Path(project_dir).expanduser().resolve(), tracking_uri or None)

    @property
    def embedded(self) -> bool:
        return self.server_uri is None

    @property
    def tracking_uri(self) -> str:
        return self.server_uri or f"sqlite:///{self.project_dir / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str | None:
        """Artifact root for new experiments (embedded store only; a server chooses its own)."""
        return (self.project_dir / "artifacts").as_uri() if self.embedded else None

    def check_reachable(self) -> None:
        """Fail now, with one line, if a configured tracking server does not answer."""
        if self.server_uri is not None and self.server_uri.startswith(("http://", "https://")):
            check_server(self.server_uri)

    def prepare(self) -> None:
        """Create the project folder and the embedded store (if used), or check the server."""
        if self.embedded:
            self.project_dir.mkdir(parents=True, exist_ok=True)
            if not (self.project_dir / "mlflow.db").exists():
                # Create the store with the project's artifact root, so that MLflow's "Default"
                # experiment too keeps its artifacts in the project folder, not in the working directory.
                from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

                SqlAlchemyStore(self.tracking_uri, self.artifact_location)
            return
        self.check_reachable()

    def dashboard_command(self) -> str:
        """The command that opens the MLflow dashboard on this store, runnable from any shell."""
        if self.embedded:
            return f"{_bioflow_command()} dashboard --project-dir {shlex.quote(str(self.project_dir))}"
        return f"open {self.server_uri} in a web browser"


def _bioflow_command() -> str:
    """``bioflow`` if that name runs this installation, else the absolute path of this command."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "bioflow" and script.is_file():
        on_path = shutil.which("bioflow")
        if on_path and Path(on_path).resolve() == script:
            return "bioflow"
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m bioflow"


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Raise a one-line error unless the MLflow server at ``uri`` answers its health check."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - user-configured URI
            if response.status != 200:
                raise BioflowError(f"MLflow tracking server {uri} answered {response.status} to {url}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BioflowError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix logger.tracking_uri, "
            "or leave logger.tracking_uri unset to use the embedded store"
        ) from exc
