"""Composition of every shipped config, and config errors reported before training starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bioflow.config import CONFIG_PACKAGE, PRIMARY_CONFIG, validate_structure
from bioflow.training.validation import validate
from bioflow.errors import ConfigError
from tests.helpers import REPO, run_cli

CONFIGS = REPO / "configs"
OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONFIGS.iterdir()
    if group.is_dir() and not group.name.startswith("_")
    for option in group.glob("*.yaml")
)


def composed(*overrides: str) -> dict:
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        cfg = compose(config_name=PRIMARY_CONFIG, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def missing_keys(*overrides: str) -> list[str]:
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        return sorted(OmegaConf.missing_keys(compose(config_name=PRIMARY_CONFIG, overrides=list(overrides))))


def test_every_group_has_options():
    groups = {g for g, _ in OPTIONS}
    assert {"task", "data", "model", "loss", "sampler", "trainer", "logger", "experiment"} <= groups


#: Options that fit only some tasks are composed with such a task.
FITTING_TASK = {("batch_transform", o): "task=n2v" for o in ("n2v", "n2v2", "structn2v")} | {
    ("loss", "stardist"): "task=stardist", ("loss", "mae"): "task=care", ("loss", "mse"): "task=care",
    ("loss", "masked_mse"): "task=n2v",
    ("loss", "laplace_nll"): "task=care", ("loss", "gaussian_nll"): "task=care", ("loss", "masked_gaussian_nll"): "task=n2v",
}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_config_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}"] + ([FITTING_TASK[(group, option)]] if (group, option) in FITTING_TASK else [])
    if option.endswith("_nll"):  # likelihood losses train probabilistic models
        overrides.append("task.probabilistic=true")
    # options with mandatory values (`???`, e.g. folders of the user's data) get placeholders
    filled = [f"{key}={tmp_path}" for key in missing_keys(*overrides)]
    config = composed(*overrides, *filled)
    validate(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=n2v", "loss=ce_dice"], "loss=ce_dice: task 'n2v' trains on blind-spot masked images"),
        (["task=care", "loss=stardist"], "use loss=mae"),
        (["task=stardist", "loss=dice"], "use loss=stardist"),
        (["task=segmentation", "loss=masked_mse"], "class masks"),
        (["task=segmentation", "batch_transform=n2v"], "batch_transform=n2v: task 'segmentation' does not use"),
        (["task=stardist", "postprocessor=connected_components"], "postprocessor=connected_components"),
        (["task=care", "batch_transform=n2v"], "batch_transform=null"),
    ],
)
def test_components_that_do_not_fit_the_task_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(composed(*overrides))


def test_a_task_brings_its_own_loss_model_and_transform():
    stardist, n2v, care = composed("task=stardist"), composed("task=n2v"), composed("task=care")
    assert stardist["loss"]["name"] == "stardist" and stardist["model"]["upsampling"] == "nearest"
    assert n2v["loss"]["name"] == "masked_mse" and n2v["batch_transform"]["name"] == "n2v"
    assert care["loss"]["name"] == "mae" and care["model"]["residual"] is True
    assert composed("task=stardist", "model=unet")["model"]["norm"] == "batch"  # the command line still wins
    for config in (stardist, n2v, care):
        validate(config)


def test_configs_are_shipped_in_the_package():
    import importlib.resources

    files = importlib.resources.files(CONFIG_PACKAGE)
    assert files.joinpath("train.yaml").is_file()
    assert files.joinpath("model", "unet.yaml").is_file()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["data"].update(patch_sise=[64, 64]), r"data\.patch_sise: unknown config key; did you mean 'patch_size'"),
        (lambda c: c["data"].update(batch_size="eight"), r"data\.batch_size: expected int, got 'eight'"),
        (lambda c: c.update(sed=1), r"^sed: unknown config key; did you mean 'seed'"),
        (lambda c: c["logger"].pop("experiment_name"), r"logger\.experiment_name: missing"),
        (lambda c: c["trainer"].update(logger=False), r"trainer\.logger: set by bioflow"),
        (lambda c: c.update(model={"depth": 3}), r"model: expected a component"),
    ],
)
def test_structure_errors_name_the_key_path(mutate, message):
    config = composed()
    mutate(config)
    with pytest.raises(ConfigError, match=message):
        validate_structure(config)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["model"].update(dept=2), r"model\.dept: model 'unet' has no argument 'dept'; did you mean 'depth'"),
        (lambda c: c["model"].update(norm="group"), r"model\.norm: expected one of 'batch', 'instance', 'none', got 'group'"),
        (lambda c: c["model"].update(name="unett"), r"unknown model 'unett'; did you mean 'unet'"),
        (lambda c: c["loss"].update(name="focall"), r"unknown loss 'focall'; did you mean 'focal'"),
        (lambda c: c["task"].update(num_clases=3), r"task\.num_clases: .*did you mean 'num_classes'"),
        (lambda c: c["trainer"].update(max_epoch=3), r"trainer\.max_epoch: .*did you mean 'max_epochs'"),
        (lambda c: c["optimizer"].update(lr="fast"), r"optimizer\.lr: expected"),
        (lambda c: c["optimizer"].update(name="adamx"), r"optimizer\.name: unknown optimizer 'adamx'"),
        (lambda c: c["data"]["source"].update(n_image=3), r"data\.source\.n_image: .*did you mean 'n_images'"),
    ],
)
def test_component_errors_name_the_key_path(mutate, message):
    config = composed()
    mutate(config)
    with pytest.raises(Exception, match=message):
        validate(config)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.dept=2", "model.dept: no such config key; did you mean 'model.depth'?"),
        ("data.sourc.n_images=3", "did you mean 'data.source'?"),
        ("model=unett", "model=unett: no such option in config group 'model'; did you mean 'unet'?"),
        ("loss=focall", "did you mean 'focal'?"),
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("model.depth=two", "model.depth"),
        ("data.source.name=nuclei", "unknown data source 'nuclei'"),
        ("data=tiff_folder", "data.source.images"),
    ],
)
def test_cli_config_errors_are_one_line_before_training(override, expected, tmp_path):
    result = run_cli("train", override, f"project_dir={tmp_path}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bioflow: error:") and expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # failed before any run or store was made


def test_config_files_have_no_python_import_paths():
    """Components are named by registry name, never by import path."""
    for path in CONFIGS.rglob("*.yaml"):
        text = path.read_text()
        assert "_target_" not in text, path


def test_a_value_the_parser_cannot_read_gets_the_quoted_spelling_that_it_can():
    from bioflow.config import compose, explain_parse_error

    assert explain_parse_error(["model.depth=2", "data.split.val=0.2"]) is None
    line = explain_parse_error(["model.depth=2", "data.split.test=[细胞 3, b]", "x=ä"])
    assert line.startswith("data.split.test=[细胞 3, b]:") and "\"data.split.test=['细胞 3','b']\"" in line
    config = compose(["data.split.test=['细胞 3','b']"])  # the spelling suggested works
    assert config["data"]["split"]["test"] == ["细胞 3", "b"]
    assert "\"logger.experiment_name='Zellen_ä'\"" in explain_parse_error(["logger.experiment_name=Zellen_ä"])
    assert "close lists" in explain_parse_error(["data.split.test=[a,b"])


def test_train_takes_project_dir_as_the_other_commands_do(tmp_path):
    from bioflow.cli.train import project_dir_option
    from tests.helpers import run_cli

    assert project_dir_option(["--project-dir", "a b", "x=1", "--project-dir=c"]) == ["project_dir='a b'", "x=1",
                                                                                      "project_dir='c'"]
    folder = tmp_path / "projekt ä"
    result = run_cli("train", "--project-dir", str(folder), "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    import yaml

    assert yaml.safe_load(result.stdout)["project_dir"] == str(folder)
