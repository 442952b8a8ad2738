"""A plugin's life: its configs and components used by a run; the model outliving its uninstall; safe loading."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from tests.helpers import make_distribution, run_cli

LABNET = """
import torch
from torch import nn

class LabNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, width: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, out_channels, 1))

    def forward(self, x):
        return self.body(x)
"""


@pytest.fixture
def lab_plugin(tmp_path):
    root = tmp_path / "site"
    make_distribution(
        root, "lab-nets", "2.1.0",
        {"bioflow.models": {"labnet": "lab_nets.nets:LabNet"}, "bioflow.configs": {"lab-nets": "lab_nets.configs"}},
        {"lab_nets/__init__.py": "", "lab_nets/nets.py": LABNET, "lab_nets/configs/__init__.py": "",
         "lab_nets/configs/model/labnet.yaml": "name: labnet\nwidth: 6\n"},
    )
    return root


def test_a_missing_plugin_is_named_with_its_version(lab_plugin, tmp_path):
    ckpt = tmp_path / "lab.ckpt"
    env = dict(os.environ, PYTHONPATH=str(lab_plugin))
    code = f"from bioflow.testing import make_checkpoint; make_checkpoint({str(ckpt)!r}, 'model=labnet')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((32, 32), np.uint16))
    with_plugin = run_cli("predict", str(ckpt), str(tmp_path / "a.tif"), "--out", str(tmp_path / "o1"), "--no-progress",
                          env={"PYTHONPATH": str(lab_plugin)})
    assert with_plugin.returncode == 0, with_plugin.stderr
    without = run_cli("predict", str(ckpt), str(tmp_path / "a.tif"), "--out", str(tmp_path / "o2"))
    assert without.returncode == 2
    message = without.stderr.strip()
    assert message.count("\n") == 0 and "Traceback" not in message
    assert "model 'labnet'" in message and "'lab-nets' 2.1.0" in message
    assert "pip install 'lab-nets==2.1.0'" in message
    # bioflow itself keeps working without the plugin
    assert run_cli("plugins", "--check").returncode == 0
    config_error = run_cli("train", "model=labnet", f"project_dir={tmp_path / 'p'}")
    assert config_error.returncode == 2 and "model=labnet: no such option in config group 'model'" in config_error.stderr


def test_plugin_configs_are_found_by_group_name(lab_plugin, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(lab_plugin))
    code = "from bioflow.testing import compose_config; print(compose_config('model=labnet')['model'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "{'name': 'labnet', 'width': 6}"


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "bioflow": {}, "hyper_parameters": Payload()}, tmp_path / "evil.ckpt")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((16, 16), np.uint16))
    for command in (["evaluate", str(tmp_path / "evil.ckpt"), "--no-log"],
                    ["predict", str(tmp_path / "evil.ckpt"), str(tmp_path / "a.tif"), "--out", str(tmp_path / "o")]):
        result = run_cli(*command)
        assert result.returncode == 2 and "refused" in result.stderr and "posix.system" in result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and len(line) < 250 and "allowlist" not in line.lower() and "Traceback" not in line
    assert not marker.exists()
    assert not (tmp_path / "o").exists()  # nothing was written for a refused model
