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

import contextlib
import json
import os
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
            # Jobs started together on a new project must not both create (migrate) the store.
            with _exclusive(self.project_dir / ".mlflow.db.lock"):
                if not (self.project_dir / "mlflow.db").exists():
                    # Create the store with the project's artifact root, so that MLflow's "Default"
                    # experiment too keeps its artifacts in the project folder, not in the working directory.
                    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

                    SqlAlchemyStore(self.tracking_uri, self.artifact_location)
            return
        self.check_reachable()

    def check_intact(self) -> "Store":
        """Fail now, with one line naming the file, if the embedded store is not a readable MLflow
        store (overwritten, truncated, a copy gone wrong); a store another job holds locked is
        not damaged and passes. Returns the store (``Store.create(...).check_intact()``)."""
        import sqlite3

        database = self.project_dir / "mlflow.db"
        if not self.embedded or not database.is_file():
            return self
        advice = "restore a backup or move it aside"
        try:
            connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=30)
            try:
                tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "experiments" in tables:  # every page's structure (about a second per GiB)
                    problems = [row[0] for row in connection.execute("PRAGMA quick_check(3)")]
                    if problems != ["ok"]:
                        raise sqlite3.DatabaseError(problems[0][:80])
            finally:
                connection.close()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return self  # another job is writing: MLflow waits for it
            raise BioflowError(f"{database}: unreadable MLflow store ({exc}); {advice}") from None
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            raise BioflowError(f"{database}: damaged MLflow store ({str(exc)[:60]}); {advice}") from None
        if tables and "experiments" not in tables:
            raise BioflowError(f"{database}: not an MLflow store (no MLflow tables); {advice}")
        return self

    @property
    def exists(self) -> bool:
        """Whether there is anything to read: the embedded store file, or a server (assumed)."""
        return not self.embedded or (self.project_dir / "mlflow.db").is_file()

    def remember(self) -> None:
        """Add this store to the list of stores bioflow knows (so that run ids are found later)."""
        known = [s for s in known_stores() if s != self]
        write_known_stores([self] + known)

    def predict_command(self, run_id: str) -> str:
        """The command that applies the model of ``run_id`` to a user's images."""
        where = f" --project-dir {shlex.quote(str(self.project_dir))}" if self.embedded else f" --tracking-uri {self.server_uri}"
        return f"{_bioflow_command()} predict {run_id} <images or folder> --out <output folder>{where}"

    def dashboard_url(self, port: int = 5000) -> str:
        """Where the dashboard of this store is seen (``bioflow dashboard``, or the server)."""
        return f"http://127.0.0.1:{port}" if self.embedded else str(self.server_uri)

    def dashboard_command(self) -> str:
        """The command that opens the MLflow dashboard on this store, runnable from any shell."""
        if self.embedded:
            return f"{_bioflow_command()} dashboard --project-dir {shlex.quote(str(self.project_dir))}"
        return f"open {self.server_uri} in a web browser"


#: Environment variable naming the default project folder (else ``bioflow-runs`` in the working directory).
PROJECT_DIR_ENV = "BIOFLOW_PROJECT_DIR"


def default_project_dir() -> str:
    return os.environ.get(PROJECT_DIR_ENV, "bioflow-runs")


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (POSIX advisory lock; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _state_file() -> Path:
    """Where bioflow keeps the list of stores it has trained into (``$BIOFLOW_STATE_DIR``, default
    ``~/.local/state/bioflow``)."""
    folder = os.environ.get("BIOFLOW_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "bioflow"
    )
    return Path(folder) / "stores.json"


def known_stores() -> list[Store]:
    """Stores that training runs were logged into, newest first (unreadable state: none)."""
    try:
        entries = json.loads(_state_file().read_text())
        return [Store.create(e["project_dir"], e.get("tracking_uri")) for e in entries]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def write_known_stores(stores: list[Store], limit: int = 50) -> None:
    path = _state_file()
    entries = [{"project_dir": str(s.project_dir), "tracking_uri": s.server_uri} for s in stores[:limit]]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(entries, indent=1))
        os.replace(partial, path)
    except OSError:  # a read-only home must not stop training; run ids then need --project-dir
        pass


def find_run(run_id: str, store: Store, explicit: bool) -> Store:
    """The store that holds ``run_id``: ``store`` if it does, else (unless the user named ``store``
    explicitly) the known stores in turn. Never creates a store."""
    candidates = [store] + ([] if explicit else [s for s in known_stores() if s != store])
    for candidate in candidates:
        if candidate.exists and _has_run(candidate, run_id):
            return candidate
    searched = [str(c.project_dir) if c.embedded else c.tracking_uri for c in candidates if c.exists]
    where = f"in {searched[0]}" + (f" or {len(searched) - 1} other store(s)" if len(searched) > 1 else "") if searched \
        else f"(no MLflow store in {store.project_dir})"
    raise BioflowError(f"run {run_id}: not found {where}; give the --project-dir it was trained in")


def _has_run(store: Store, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(store.tracking_uri).get_run(run_id)
        return True
    except MlflowException:
        return False
    except Exception:  # an unreadable store is not this run's store
        return False


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
