"""Helpers for tests: fake plugin distributions and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIOFLOW = str(Path(sys.executable).with_name("bioflow"))


def make_distribution(
    root: Path,
    name: str,
    version: str,
    entry_points: dict[str, dict[str, str]],
    modules: dict[str, str] | None = None,
) -> Path:
    """Write an installed-looking distribution (dist-info + modules) under ``root``.

    Putting ``root`` on ``sys.path`` (or PYTHONPATH) makes it visible to importlib.metadata exactly
    like a pip-installed package.
    """
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for filename, code in (modules or {}).items():
        path = root / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
    return root


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed ``bioflow`` command in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [BIOFLOW, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )


def task_and_data(*overrides: str):
    """A task built from a composed config (untrained) and its prepared data module, as training
    builds them, without training."""
    from bioflow.data.module import BioflowDataModule
    from bioflow.tasks import create_task, get_task
    from bioflow.testing import compose_config

    config = compose_config(*overrides)
    cls = get_task(config["task"]["name"])
    data = BioflowDataModule(config["data"], config["sampler"], 0, cls.target_kind, None)
    data.prepare()
    task = create_task(config, {"in_channels": 1, "spatial_dims": 2, "pixel_size": None, "split": data.split,
                                "normalization": data.normalizer.as_dict()})
    return task, data
