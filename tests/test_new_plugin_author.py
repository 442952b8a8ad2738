"""The path of a new plugin author, end to end: copy the example, rename, install, list, train, test, uninstall."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

from tests.helpers import REPO, run_cli

RENAMES = [
    ("bioflow_example_plugin", "kidney_lab_models"),
    ("bioflow-example-plugin", "kidney-lab-models"),
    ("dilated_resnet", "kidney_resnet"),
    ("tversky", "kidney_tversky"),
    ("distance_split", "kidney_split"),
    ("example_plugin_demo", "kidney_demo"),
    ("field_classifier", "kidney_fields"),
    ("FieldClassifierTask", "KidneyFieldTask"),
]


def renamed_copy(target: Path) -> Path:
    shutil.copytree(REPO / "plugins" / "bioflow-example-plugin", target,
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache"))
    for path in sorted(target.rglob("*"), key=lambda p: -len(p.parts)):  # deepest first, for renames
        if path.is_file():
            text = path.read_text()
            for old, new in RENAMES:
                text = text.replace(old, new)
            path.write_text(text)
        name = path.name
        for old, new in RENAMES:
            name = name.replace(old, new)
        if name != path.name:
            path.rename(path.with_name(name))
    return target


def test_copy_rename_install_list_train_test_uninstall(tmp_path):
    package = renamed_copy(tmp_path / "kidney-lab-models")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target", str(site), "-q", str(package)],
        check=True, capture_output=True,
    )
    env = {"PYTHONPATH": str(site)}

    listing = run_cli("plugins", env=env)
    assert re.search(r"kidney_resnet\s+kidney-lab-models 0\.1\.0", listing.stdout)
    assert "kidney_split" in listing.stdout and "kidney_tversky" in listing.stdout
    assert re.search(r"kidney_fields\s+kidney-lab-models 0\.1\.0", listing.stdout)  # a task of its own
    assert run_cli("plugins", "--check", env=env).returncode == 0

    project = tmp_path / "project"
    train = run_cli(
        "train", "experiment=kidney_demo", "data.source.n_images=5", "data.source.shape=[48,48]",
        "data.patch_size=[32,32]", "data.patches_per_epoch=4", "data.batch_size=2", "model.width=4",
        "model.blocks=2", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", f"project_dir={project}",
        env=env, cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    checkpoint = next(project.glob("outputs/*/*/checkpoints/best-*.ckpt"))

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=package,
                           env={**os.environ, **env}, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-2000:]
    assert "kidney-lab-models:kidney_resnet" in subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider"], cwd=package,
        env={**os.environ, **env}, capture_output=True, text=True).stdout

    tifffile.imwrite(tmp_path / "a.tif", np.zeros((40, 40), np.uint16))
    predicted = run_cli("predict", str(checkpoint), str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"),
                        "--no-progress", env=env)
    assert predicted.returncode == 0, predicted.stderr
    assert (tmp_path / "out" / "a_instances.tif").exists()  # the plugin's post-processor ran

    # The plugin's own task: chosen by name, trained and applied like a built-in one.
    fields = tmp_path / "fields"
    train = run_cli(
        "train", "task=kidney_fields", "data=synthetic_nuclei", "data.source.n_images=6",
        "data.source.shape=[48,48]", "data.patch_size=[32,32]", "data.patches_per_epoch=4", "data.batch_size=2",
        "model.depth=2", "model.base_channels=4", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        f"project_dir={fields}", env=env, cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    assert "test/accuracy" in train.stdout
    field_checkpoint = next(fields.glob("outputs/*/*/checkpoints/best-*.ckpt"))
    predicted = run_cli("predict", str(field_checkpoint), str(tmp_path / "a.tif"), "--out", str(tmp_path / "out3"),
                        "--no-progress", env=env)
    assert predicted.returncode == 0, predicted.stderr
    evidence = tifffile.imread(tmp_path / "out3" / "a.tif")  # the first output takes the input's name
    assert evidence.shape == (40, 40) and 0 <= evidence.min() <= evidence.max() <= 1

    shutil.rmtree(site)  # uninstalled
    assert run_cli("plugins", "--check").returncode == 0
    missing = run_cli("predict", str(checkpoint), str(tmp_path / "a.tif"), "--out", str(tmp_path / "out2"))
    assert missing.returncode == 2 and "pip install 'kidney-lab-models==0.1.0'" in missing.stderr
