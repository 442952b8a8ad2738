"""``bioflow dashboard``: the MLflow server on 127.0.0.1, run and stopped as one process group."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from bioflow.cli.common import fail


def dashboard_command(args: argparse.Namespace) -> int:
    """``bioflow dashboard``: an MLflow server on 127.0.0.1 for the project's store, until Ctrl+C."""
    import shutil
    import signal

    from bioflow.tracking.store import Store

    store = Store.create(args.project_dir).check_intact()
    if not (store.project_dir / "mlflow.db").is_file():
        return fail(f"{store.project_dir}: no MLflow store here (mlflow.db); train first or pass --project-dir")
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if mlflow is None:
        return fail("the mlflow command is not installed in this environment")
    cmd = [
        mlflow, "server", "--backend-store-uri", store.tracking_uri,
        "--default-artifact-root", store.artifact_location, "--host", "127.0.0.1", "--port", str(args.port),
        "--workers", "1",
    ]
    print(f"MLflow dashboard for {store.project_dir} at http://127.0.0.1:{args.port} (Ctrl+C stops it)", flush=True)
    for name, page in _experiment_pages(store, args.port):
        print(f"  {name}: {page}", flush=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    # The server runs in a process group of its own, and the whole group is stopped on Ctrl+C or
    # SIGTERM: stopping only the mlflow process can leave its web worker listening.
    server = subprocess.Popen(cmd, env=env, start_new_session=True)

    def stop(*_args) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(server)


def _experiment_pages(store, port: int) -> list[tuple[str, str]]:
    """The runs page of every experiment in the store, in the model-training view."""
    from mlflow.tracking import MlflowClient

    from bioflow.tracking.run import runs_page

    try:
        experiments = MlflowClient(store.tracking_uri).search_experiments()
    except Exception:  # the links are a courtesy; the dashboard works without them
        return []
    return [(e.name, runs_page(store.dashboard_url(port), e.experiment_id)) for e in experiments if e.name != "Default"]


def _stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to ``process``'s process group, SIGKILL after ``grace`` seconds if it lingers."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
