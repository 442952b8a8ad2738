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


def write_ome_zarr(path: Path, image, axes: str, scale: dict[str, float] | None = None, labels: dict | None = None,
                   version: str = "0.5", chunks=None) -> Path:
    """An OME-Zarr store as other tools write it (ome-zarr-py): ``image`` with ``axes`` (e.g.
    ``"czyx"``), physical ``scale`` per axis, label images ``{name: array}`` (spatial axes only),
    NGFF ``version`` 0.4 (zarr v2) or 0.5 (zarr v3), no pyramid."""
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image, write_labels

    fmt = FormatV04() if version == "0.4" else FormatV05()
    location = parse_url(str(path), mode="w", fmt=fmt)
    root = zarr.group(store=location.store, zarr_format=2 if version == "0.4" else 3, overwrite=True)
    units = {a: "micrometer" for a in axes if a in "zyx"}
    extra = {"storage_options": {"chunks": chunks}} if chunks is not None else {}
    write_image(image, root, axes=axes, scale=scale, axes_units=units if scale else None, scale_factors=[], fmt=fmt,
                **extra)
    spatial = "".join(a for a in axes if a in "zyx")
    for name, mask in (labels or {}).items():
        write_labels(mask, root, name=name, axes=spatial, scale={a: scale[a] for a in spatial} if scale else None,
                     axes_units={a: "micrometer" for a in spatial} if scale else None, scaler=None, scale_factors=[],
                     fmt=fmt)
    return path
