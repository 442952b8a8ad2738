"""Screenshots of a real ``bioflow dashboard``, taken by headless Chromium.

Starts ``bioflow dashboard`` on a project's store (or, without ``--project-dir``, on a new
project where two tiny demo runs are trained first), and saves PNGs of

* ``runs.png``: an experiment's runs in the model-training view, test scores as columns;
* ``figure.png``: a run's validation figure (input, outlines, prediction, ground truth);
* ``compare.png``: the compare-runs page of two runs of the experiment;

then stops the dashboard with SIGTERM and checks that nothing listens on its port any more.
Needs Chromium (Debian: ``apt-get install chromium``). Prints one JSON object.

Run: .venv/bin/python scripts/dashboard_screenshots.py --out screenshots/ [--project-dir bioflow-runs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TINY = ["experiment=demo_unet", "trainer.max_epochs=2", "data.source.n_images=8", "data.patches_per_epoch=32",
        "model.base_channels=8", "model.depth=2", "trainer.enable_progress_bar=false"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def screenshot(chromium: str, url: str, target: Path, profile: Path, size: str = "1800,1000") -> bool:
    shutil.rmtree(profile, ignore_errors=True)
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                    "--virtual-time-budget=25000", f"--screenshot={target}", url],
                   capture_output=True, timeout=120)
    return target.is_file() and target.stat().st_size > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", help="a project with runs (default: train two tiny runs in a new one)")
    parser.add_argument("--out", default="dashboard-screenshots")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("dashboard_screenshots: Chromium not found (Debian: apt-get install chromium)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bioflow-dashboard-"))
    bioflow = Path(sys.executable).with_name("bioflow")
    project = Path(args.project_dir).resolve() if args.project_dir else work / "project"
    if not args.project_dir:
        for seed in (1, 2):
            subprocess.run([str(bioflow), "train", *TINY, f"seed={seed}", f"project_dir={project}"], check=True,
                           cwd=work, capture_output=True)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = next(e for e in client.search_experiments() if e.name != "Default")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=2)
    figures = [a.path for a in client.list_artifacts(runs[0].info.run_id, "figures")]

    port = free_port()
    server = subprocess.Popen([str(bioflow), "dashboard", "--project-dir", str(project), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    report: dict = {"project": str(project), "experiment": experiment.name, "port": port, "shots": {}}
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    sys.exit("dashboard_screenshots: the dashboard did not start")
                time.sleep(0.5)
        from bioflow.tracking.run import runs_page

        base = f"http://127.0.0.1:{port}"
        ids = json.dumps([r.info.run_id for r in runs])
        pages = {
            "runs.png": runs_page(base, experiment.experiment_id),
            "figure.png": f"{base}/#/experiments/{experiment.experiment_id}/runs/{runs[0].info.run_id}/artifacts/"
                          f"{figures[-1] if figures else ''}?workflowType=machine_learning",
            "compare.png": f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment.experiment_id])}",
        }
        for name, url in pages.items():
            report["shots"][name] = {"url": url, "ok": screenshot(args.chromium, url, out / name, work / "chrome")}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    deadline = time.time() + 15
    while listening(port) and time.time() < deadline:
        time.sleep(0.5)
    report["still_listening_after_sigterm"] = listening(port)
    report["out"] = str(out)
    shutil.rmtree(work, ignore_errors=True) if args.project_dir else None
    print(json.dumps(report, indent=1))
    sys.exit(0 if all(s["ok"] for s in report["shots"].values()) and not report["still_listening_after_sigterm"] else 1)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    main()
