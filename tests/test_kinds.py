"""One description of each component kind (bioflow.kinds), read by the registry, config validation,
loading and the test kit; components registered in memory; the attribute names of earlier releases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from bioflow.config import COMPONENT_SECTIONS
from bioflow.errors import ConfigError, RegistryError
from bioflow.kinds import KINDS, kind
from bioflow.registry import KINDS as GROUPS
from bioflow.registry import RENAMED_KINDS, SINGULAR, Registry
from bioflow.testing import CHECKS, check_loss, check_postprocessor, compose_config


def test_every_reader_of_the_kinds_takes_them_from_the_one_table():
    assert list(GROUPS) == [k.name for k in KINDS]
    assert all(GROUPS[k.name] == f"bioflow.{k.name}" and SINGULAR[k.name] == k.singular for k in KINDS)
    assert RENAMED_KINDS == {"architectures": "models", "datasets": "sources"}
    assert COMPONENT_SECTIONS == {k.section: k.name for k in KINDS if k.section}
    assert set(CHECKS) == {k.name for k in KINDS if k.check}
    assert kind("architectures") is kind("models")
    with pytest.raises(RegistryError, match="kinds are: tasks, models"):
        kind("widgets")


def test_the_entry_point_groups_of_pyproject_are_kinds():
    import tomllib

    from tests.helpers import REPO

    groups = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    used = {g for g in groups if g.startswith("bioflow.")}
    assert used <= {k.group for k in KINDS}, used - {k.group for k in KINDS}


class HalfLoss(torch.nn.Module):
    """A loss on target images (for a registered-in-memory component)."""

    bioflow_targets = ("image",)

    def forward(self, prediction, target):
        return 0.5 * ((prediction - target) ** 2).mean()


def test_a_component_registered_in_memory_is_found_used_and_removed():
    registry = Registry(entry_points=lambda group: [])
    comp = registry.register("losses", "half", HalfLoss)
    assert comp.qualified_name == "local:half" and registry.names("losses") == ["half"]
    assert isinstance(registry.create("losses", "half"), HalfLoss)
    with pytest.raises(RegistryError, match="registered already"):
        registry.register("losses", "half", HalfLoss)
    registry.unregister("losses", "half")
    with pytest.raises(RegistryError, match="unknown loss 'half'"):
        registry.load("losses", "half")


def with_loss(name: str, *overrides: str) -> dict:
    config = compose_config(*overrides)
    config["loss"] = {"name": name}  # a component without a config file of its own
    return config


def test_a_loss_registered_in_memory_validates_with_its_task():
    from bioflow.registry import registry
    from bioflow.training.validation import validate_components

    registry.register("losses", "half_mse", HalfLoss)
    try:
        validate_components(with_loss("half_mse", "task=care"))
        with pytest.raises(ConfigError, match="loss=half_mse: task 'segmentation' trains on class masks, this loss on "
                                              "target images; use loss=ce_dice"):
            validate_components(with_loss("half_mse", "task=segmentation"))
        # what would fit is asked of the registry: the new loss is offered for target images
        with pytest.raises(ConfigError, match="losses for it: half_mse, mae, mse"):
            validate_components(with_loss("dice", "task=care"))
    finally:
        registry.unregister("losses", "half_mse")


def test_a_section_the_task_does_not_use_names_the_tasks_that_do():
    from bioflow.training.validation import validate_components

    with pytest.raises(ConfigError, match=r"task 'care' does not use a batch transform \(task 'n2v' does\)"):
        validate_components(compose_config("task=care", "batch_transform=n2v"))


# -- names of earlier releases -------------------------------------------------------------------------------
class OldLoss(torch.nn.Module):
    def forward(self, prediction, target):
        return ((prediction - target) ** 2).mean()

    @staticmethod
    def example_inputs(spatial_dims):
        shape = (2, 1) + (8,) * spatial_dims
        return torch.randn(shape), torch.randn(shape)


class OldPostprocessor:
    def __call__(self, output):
        return (np.asarray(output)[1] > 0.5).astype(np.int32)

    @staticmethod
    def example_input(spatial_dims):
        fg = np.zeros((16,) * spatial_dims, np.float32)
        fg[(slice(2, 6),) * spatial_dims] = 1.0
        return np.stack([1 - fg, fg])


def test_components_written_for_the_earlier_attribute_names_still_pass_with_a_warning():
    with pytest.warns(DeprecationWarning, match="'example_inputs' is now called 'bioflow_example_inputs'"):
        check_loss(OldLoss)
    with pytest.warns(DeprecationWarning, match="'example_input' is now called 'bioflow_example_inputs'"):
        check_postprocessor(OldPostprocessor)


def test_a_task_written_for_loss_targets_still_fits_its_loss_with_a_warning():
    from bioflow.tasks.restoration import CARETask
    from bioflow.training.validation import check_compatibility

    with pytest.warns(DeprecationWarning, match="'loss_targets' is now 'bioflow_targets'"):
        class OldTask(CARETask):
            loss_targets = "image"
    assert OldTask.bioflow_targets == ("image",)
    check_compatibility(compose_config("task=care"), "old", OldTask)  # mae takes images: no error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the current name warns about nothing

        class NewTask(CARETask):
            bioflow_targets = ("image",)
