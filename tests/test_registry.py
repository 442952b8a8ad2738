"""Registry behaviour with fake installed distributions: clashes, broken plugins, lazy loading."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest

from bioflow.errors import ConfigError, RegistryError
from bioflow.registry import KINDS, Registry, registry
from tests.helpers import make_distribution, run_cli


def registry_with(path) -> Registry:
    """A registry that sees the installed distributions plus those under ``path``."""

    def entry_points(group: str):
        eps = []
        seen = set()
        for dist in metadata.distributions(path=[str(path), *sys.path]):
            key = dist.metadata["Name"].lower()
            if key in seen:
                continue
            seen.add(key)
            eps += [ep for ep in dist.entry_points if ep.group == group]
        return eps

    return Registry(entry_points)


@pytest.fixture
def plugin_root(tmp_path, monkeypatch):
    root = tmp_path / "site"
    make_distribution(
        root, "good-plugin", "1.2.0",
        {"bioflow.models": {"tiny": "good_plugin:Tiny"}, "bioflow.losses": {"l1": "good_plugin:L1"}},
        {"good_plugin.py": """
            IMPORTED = True
            class Tiny:
                def __init__(self, in_channels: int, out_channels: int, width: int = 4):
                    self.width = width
            class L1:
                pass
        """},
    )
    make_distribution(
        root, "clash-plugin", "0.3.1",
        {"bioflow.models": {"unet": "clash_plugin:UNet"}},
        {"clash_plugin.py": "class UNet:\n    pass\n"},
    )
    make_distribution(
        root, "broken-plugin", "2.0.0",
        {"bioflow.losses": {"broken": "broken_plugin:Loss"}},
        {"broken_plugin.py": "raise ImportError('needs libfoo')\n"},
    )
    make_distribution(
        root, "sideeffect-plugin", "1.0",
        {"bioflow.samplers": {"loud": "sideeffect_plugin:S"}},
        {"sideeffect_plugin.py": "import pathlib, os\npathlib.Path(os.environ['SIDE_EFFECT_FILE']).write_text('imported')\nS = object\n"},
    )
    monkeypatch.syspath_prepend(str(root))
    return root


def test_builtins_are_entry_points():
    assert "unet" in registry.names("models")
    assert {"cross_entropy", "dice", "ce_dice"} <= set(registry.names("losses"))
    builtin = {c.name for c in registry.components("losses") if c.distribution == "bioflow"}
    assert {"cross_entropy", "dice", "ce_dice"} <= builtin


def test_listing_imports_no_plugin_code(plugin_root, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("SIDE_EFFECT_FILE", str(marker))
    reg = registry_with(plugin_root)
    for kind in KINDS:
        reg.components(kind)
    assert "loud" in reg.names("samplers")
    assert not marker.exists()
    assert "good_plugin" not in sys.modules
    reg.load("samplers", "loud")
    assert marker.read_text() == "imported"


def test_unknown_name_suggests_close_names_and_the_listing_command(plugin_root):
    reg = registry_with(plugin_root)
    with pytest.raises(RegistryError) as err:
        reg.resolve("models", "tiyn")
    message = str(err.value)
    assert "unknown model 'tiyn'" in message
    assert "did you mean 'tiny'" in message
    assert "bioflow plugins --kind models" in message


def test_clash_names_both_distributions_and_qualified_names_work(plugin_root):
    reg = registry_with(plugin_root)
    with pytest.raises(RegistryError) as err:
        reg.resolve("models", "unet")
    message = str(err.value)
    assert "'bioflow'" in message and "'clash-plugin' 0.3.1" in message
    assert "clash-plugin:unet" in message and "bioflow:unet" in message
    assert reg.resolve("models", "clash-plugin:unet").distribution == "clash-plugin"
    assert reg.load("models", "bioflow:unet").__name__ == "UNet"
    assert reg.load("models", "clash_plugin:unet").__module__ == "clash_plugin"  # names normalise
    assert "unet" in reg.clashes("models")


def test_broken_plugin_is_reported_and_others_still_work(plugin_root):
    reg = registry_with(plugin_root)
    with pytest.raises(RegistryError) as err:
        reg.load("losses", "broken")
    message = str(err.value)
    assert "'broken-plugin' 2.0.0" in message and "needs libfoo" in message
    assert reg.load("losses", "l1").__name__ == "L1"
    assert reg.load("losses", "dice").__name__ == "DiceLoss"
    problems = reg.problems()
    assert any("broken-plugin" in p for p in problems)
    assert any("clash-plugin" in p and "unet" in p for p in problems)


def test_create_checks_arguments_against_the_signature(plugin_root):
    reg = registry_with(plugin_root)
    assert reg.create("models", "tiny", in_channels=1, out_channels=2, width=8).width == 8
    with pytest.raises(ConfigError, match=r"model\.widht: .*did you mean 'width'"):
        reg.create("models", "tiny", where="model", in_channels=1, out_channels=2, widht=8)
    with pytest.raises(ConfigError, match=r"model\.width: expected int, got 'wide'"):
        reg.create("models", "tiny", where="model", in_channels=1, out_channels=2, width="wide")


def test_qualified_name_of_wrong_distribution(plugin_root):
    reg = registry_with(plugin_root)
    with pytest.raises(RegistryError, match="not provided by distribution 'good-plugin'"):
        reg.resolve("models", "good-plugin:unet")


def test_unknown_kind():
    with pytest.raises(RegistryError, match="unknown component kind"):
        registry.components("widgets")


def test_cli_plugins_lists_and_check_fails_on_clash_and_broken(plugin_root):
    env = {"PYTHONPATH": str(plugin_root), "SIDE_EFFECT_FILE": str(plugin_root / "m")}
    listing = run_cli("plugins", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "tiny" in listing.stdout and "good-plugin 1.2.0" in listing.stdout
    assert "name clash" in listing.stdout
    check = run_cli("plugins", "--check", env=env)
    assert check.returncode == 1
    assert "broken-plugin" in check.stderr and "clash-plugin" in check.stderr


def test_cli_plugins_check_passes_on_a_clean_install():
    result = run_cli("plugins", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unet" in result.stdout and "bioflow" in result.stdout
