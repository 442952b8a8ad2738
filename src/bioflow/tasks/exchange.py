"""What a task says about its models when they are shared (bioimage.io packages) and applied.

Model exchange is a capability of the task, like training and prediction: the exporter in
:mod:`bioflow.bioimageio` knows no task by name, it asks the task. Every hook has a generic default,
so a task from a plugin exports without writing any of them; a task overrides those where its
method has something to say (see docs/writing-a-task.md):

``exchange_title``, ``citations``, ``exchange_tags``
    how the package names the method, which papers it cites, which tags it carries;
``caveat``
    what users must know before applying such a model: printed by ``bioflow predict`` and written
    into the package's README (one text for both);
``package_outputs()``
    the network's output channels as the package's output tensors, each with the post-processing
    operations of the bioimage.io format that make it meaningful (softmax, sigmoid, ...); an output
    in the input's intensity units (``in_input_units``) gets the inverse of the input normalisation
    from the exporter, where the format can express it;
``package_notes()``
    sentences for the README about the outputs (what a consumer must do with them);
``package_config()``
    sections of the package's ``config`` besides bioflow's own record (e.g. StarDist's
    post-processing parameters in the layout of StarDist's own exporter);
``load_package_config(package)``
    restores, on a task rebuilt from a package, the state that is not in the network's weights
    (by default the task's own buffers, which the exporter records).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

#: Where the exporter records a task's buffers outside its network (e.g. StarDist's thresholds).
TASK_STATE = "task_state"


@dataclass
class PackageOutput:
    """One output tensor of a package: id, channel names, post-processing, what it holds.

    ``in_input_units``: the output is an image in the intensity units of the input (restoration),
    so the inverse of the input normalisation belongs to its post-processing. ``in_input_scale``:
    the output is a spread in those units (e.g. a standard deviation): only the normalisation's
    scale is undone, not its offset.
    """

    id: str
    channel_names: list[str]
    postprocessing: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    in_input_units: bool = False
    in_input_scale: bool = False


class ModelExchange:
    """The exchange hooks of a task with their generic defaults (a mixin of the task template)."""

    #: The method's name in a package's title and README (default: the class name without "Task").
    exchange_title: ClassVar[str] = ""
    #: The papers of the method, as bioimage.io cite entries (``text`` with ``doi`` or ``url``).
    citations: ClassVar[tuple[Mapping[str, str], ...]] = ()
    #: bioimage.io tags of the method (besides bioflow's own: "bioflow", "pytorch", "2d"/"3d").
    exchange_tags: ClassVar[tuple[str, ...]] = ()
    #: What users must know when they apply a model of this task ("" for nothing).
    caveat: ClassVar[str] = ""

    @classmethod
    def title(cls) -> str:
        """The method's name for people (``exchange_title``, else from the class name)."""
        name = cls.__name__
        return cls.exchange_title or (name[:-4] if name.endswith("Task") and len(name) > 4 else name)

    def prediction_caveats(self) -> list[str]:
        """What ``bioflow predict`` prints before predicting with this model."""
        return [self.caveat] if self.caveat else []

    def package_outputs(self) -> list[PackageOutput]:
        """The network's output channels as package outputs (default: one tensor, as it is)."""
        channels = int(self.out_channels())  # type: ignore[attr-defined]
        return [PackageOutput("output", [f"channel{i}" for i in range(channels)], [],
                              f"the raw output of the {self.title()} network")]

    def package_network(self):
        """The module whose output channels are the package's outputs (default: the network)."""
        return self.model  # type: ignore[attr-defined]

    def package_notes(self) -> list[str]:
        """Sentences for the package's README about its outputs."""
        return []

    def package_config(self) -> dict[str, Any]:
        """Sections of the package's ``config`` besides ``bioflow`` (default: none)."""
        return {}

    def task_state(self) -> dict[str, Any]:
        """The task's buffers outside its network, as plain lists (recorded in the package)."""
        state = self.state_dict()  # type: ignore[attr-defined]
        return {k: v.detach().cpu().tolist() for k, v in state.items() if not k.startswith("model.")}

    def load_package_config(self, package: Mapping[str, Any]) -> None:
        """Restore what a package records besides the network (``package`` is the package's whole
        ``config`` section): by default the task's buffers recorded by :meth:`task_state`."""
        import numpy as np
        import torch

        recorded = (package.get("bioflow") or {}).get(TASK_STATE) or {}
        own = self.state_dict()  # type: ignore[attr-defined]
        # a NaN (e.g. "not fitted") comes back from the package's JSON as None
        state = {k: torch.as_tensor(np.asarray(v, dtype=np.float64) if own[k].is_floating_point() else v, dtype=own[k].dtype)
                 for k, v in recorded.items() if k in own}
        if state:
            self.load_state_dict(state, strict=False)  # type: ignore[attr-defined]
