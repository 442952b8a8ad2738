"""The plugin test kit: contract checks for components, and helpers for testing models.

A component passes its contract when bioflow can use it the way its kind promises. Plugin authors
run the same checks on their components that bioflow runs on its own::

    from bioflow.testing import check_component

    def test_contract(bioflow_component):          # parametrised by bioflow's pytest plugin
        check_component(*bioflow_component)

or call a check directly: ``check_model(MyNet)``. Failed checks raise ``AssertionError``
with the reason.

Components describe themselves with optional attributes (on the class or factory function):

``bioflow_spatial_dims``
    the spatial dimensionalities supported, e.g. ``(2, 3)``. Default for models: ``(2, 3)``
    if the factory takes ``spatial_dims``, else ``(2,)``; for losses and post-processors ``(2, 3)``.
``bioflow_exports``
    models: export formats that must work, from ``"torchscript"`` and ``"onnx"``.
``bioflow_example_inputs(spatial_dims)``
    losses: returns ``(prediction, target)`` the loss is meant for (default: class logits and
    class indices); post-processors: returns ``(network_output,)``, what they take (default:
    two-class probabilities). The names of earlier releases (``example_inputs``, ``example_input``)
    are still read, with a deprecation warning.
``bioflow_targets``
    losses: the loss targets they take (default ``("classes",)``).
``bioflow_example_kwargs``
    data sources (and any component with required arguments): keyword arguments for a small example.

Besides the contracts, :func:`compose_config` and :func:`make_checkpoint` build configs and
untrained checkpoints for testing prediction and evaluation code.
"""

from bioflow.testing.configs import compose_config, make_checkpoint
from bioflow.testing.contracts import (
    CHECKS, check_architecture, check_batch_transform, check_component, check_dataset, check_loss, check_model,
    check_postprocessor, check_sampler, check_source, check_task, registered,
)
from bioflow.testing.exchange import check_exchange

__all__ = [
    "CHECKS", "check_architecture", "check_batch_transform", "check_component", "check_dataset", "check_exchange",
    "check_loss", "check_model", "check_postprocessor", "check_sampler", "check_source", "check_task",
    "compose_config", "make_checkpoint", "registered",
]
