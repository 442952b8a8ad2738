"""The kinds of components bioflow builds, each described once: its registry group, how messages
call one, the config section that names it, what bioflow gives its constructor, whether prediction
needs it, its earlier names, its contract (a :class:`typing.Protocol`) and the contract check of
the test kit. The registry, config validation, model loading, the test kit and the task template
all read this table; nothing else lists the kinds.

A component describes itself with optional ``bioflow_*`` attributes (on the class or factory
function): ``bioflow_spatial_dims`` (the dimensionalities it supports), ``bioflow_exports``
(models: export formats that must work), ``bioflow_targets`` (losses: the loss targets they take;
tasks: the loss target they hand their loss), ``bioflow_example_inputs(spatial_dims)`` (losses and
post-processors: the positional arguments of a call they are meant for) and
``bioflow_example_kwargs`` (components with required arguments). Names used before (``example_inputs``
of losses, ``example_input`` of post-processors, ``loss_targets`` of tasks) are still read, with a
deprecation warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable


# -- contracts ------------------------------------------------------------------------------------------
@runtime_checkable
class ModelContract(Protocol):
    """A network: ``(N, in_channels, *spatial) -> (N, out_channels, *spatial)`` (or coarser by the
    task's output stride), built from ``in_channels``, ``out_channels`` (and ``spatial_dims`` if it
    takes it). Optional: ``size_multiple`` (input sizes it needs), ``receptive_field()``."""

    def __call__(self, x: Any) -> Any: ...


@runtime_checkable
class LossContract(Protocol):
    """``loss(prediction, target) -> scalar tensor``; ``bioflow_targets`` names the loss targets it
    takes (default ``("classes",)``: class indices)."""

    def __call__(self, prediction: Any, target: Any) -> Any: ...


@runtime_checkable
class PostprocessorContract(Protocol):
    """``postprocessor(network_output) -> label image`` (numpy), on a whole image's output."""

    def __call__(self, output: Any) -> Any: ...


@runtime_checkable
class SamplerContract(Protocol):
    """Built from ``index`` (the patch candidates), ``num_samples`` and ``seed``: iterates over
    ``num_samples`` candidate indices per epoch (``set_epoch(epoch)`` reshuffles)."""

    def __iter__(self) -> Any: ...

    def __len__(self) -> int: ...


@runtime_checkable
class BatchTransformContract(Protocol):
    """``transform(batch, generator=None) -> (transformed batch, mask)`` on the training device,
    before the network (e.g. Noise2Void's blind-spot masking)."""

    def __call__(self, batch: Any, generator: Any = None) -> Any: ...


class SourceContract(Protocol):
    """A function returning a list of :class:`bioflow.data.records.ImageRecord` (images and targets)."""

    def __call__(self, **kwargs: Any) -> Any: ...


class TaskContract(Protocol):
    """A LightningModule built from ``config``, ``data_info``, ``inference`` and its settings (the
    rest of its keyword-only arguments); see :mod:`bioflow.tasks.base` for its hooks."""

    def prediction_outputs(self) -> list: ...

    def prediction_session(self, shape: Sequence[int], workdir: Any = None) -> Any: ...


# -- the kinds --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """One kind of component."""

    name: str  # the registry's name of the kind (plural): "models"
    singular: str  # how messages call one: "model"
    section: Optional[str]  # the config section that names one ("data.source"); None: none
    provided: frozenset[str] = frozenset()  # constructor arguments bioflow supplies itself
    for_inference: bool = False  # prediction needs it (the others may be missing where a model predicts)
    optional: bool = False  # its config section may be null
    legacy_names: tuple[str, ...] = ()  # earlier names of the kind (in checkpoints, old plugins)
    contract: Optional[type] = None
    check: Optional[str] = None  # the contract check in bioflow.testing

    @property
    def group(self) -> str:
        """The entry-point group components of this kind are registered under."""
        return f"bioflow.{self.name}"

    @property
    def legacy_groups(self) -> tuple[str, ...]:
        return tuple(f"bioflow.{n}" for n in self.legacy_names)


KINDS: tuple[Kind, ...] = (
    Kind("tasks", "task", "task", frozenset({"config", "data_info", "inference"}), for_inference=True,
         contract=TaskContract, check="check_task"),
    Kind("models", "model", "model", frozenset({"in_channels", "out_channels", "spatial_dims"}), for_inference=True,
         legacy_names=("architectures",), contract=ModelContract, check="check_model"),
    Kind("losses", "loss", "loss", contract=LossContract, check="check_loss"),
    Kind("samplers", "sampler", "sampler", frozenset({"index", "num_samples", "seed"}), contract=SamplerContract,
         check="check_sampler"),
    Kind("postprocessors", "postprocessor", "postprocessor", for_inference=True, optional=True,
         contract=PostprocessorContract, check="check_postprocessor"),
    Kind("batch_transforms", "batch transform", "batch_transform", optional=True, contract=BatchTransformContract,
         check="check_batch_transform"),
    Kind("sources", "data source", "data.source", legacy_names=("datasets",), contract=SourceContract,
         check="check_source"),
    Kind("configs", "config package", None),
)

_BY_NAME = {k.name: k for k in KINDS}
_LEGACY = {legacy: k for k in KINDS for legacy in k.legacy_names}


def kind(name: str) -> Kind:
    """The kind called ``name`` (or an earlier name of it); a one-line error naming the kinds if none is."""
    from bioflow.errors import RegistryError

    found = _BY_NAME.get(name) or _LEGACY.get(name)
    if found is None:
        raise RegistryError(f"unknown component kind '{name}'; kinds are: {', '.join(_BY_NAME)}")
    return found


def canonical_kind(name: str) -> str:
    """The current name of a kind given by its current or an earlier name (unknown names as they are)."""
    return _LEGACY[name].name if name in _LEGACY else name


def component_sections() -> dict[str, str]:
    """Config sections that name components, with their kinds."""
    return {k.section: k.name for k in KINDS if k.section is not None}


def inference_kinds() -> tuple[str, ...]:
    """The kinds a model needs to predict."""
    return tuple(k.name for k in KINDS if k.for_inference)


# -- self-descriptions, with the names of earlier releases ---------------------------------------------------
def described(obj: Any, name: str, *, old: str | None = None, default: Any = None,
              adapt: Callable[[Any], Any] | None = None) -> Any:
    """A component's ``name`` attribute, else (with a deprecation warning) its earlier name ``old``
    (through ``adapt`` when the meaning changed), else ``default``."""
    value = getattr(obj, name, None)
    if value is not None:
        return value
    if old is not None and getattr(obj, old, None) is not None:
        owner = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        warnings.warn(f"{owner}: the attribute '{old}' is now called '{name}'; the old name is read until the next "
                      "release", DeprecationWarning, stacklevel=2)
        value = getattr(obj, old)
        return adapt(value) if adapt is not None else value
    return default


def example_inputs(component: Any, kind_name: str) -> Callable[[int], tuple] | None:
    """``spatial_dims -> positional arguments`` a loss or post-processor is meant for, or None."""
    if kind_name == "postprocessors":
        old = getattr(component, "example_input", None)
        legacy = (lambda fn: (lambda dims: (fn(dims),))) if old is not None else None
        return described(component, "bioflow_example_inputs", old="example_input", adapt=legacy)
    return described(component, "bioflow_example_inputs", old="example_inputs")


def loss_targets_taken(loss: Any) -> tuple[str, ...]:
    """The loss targets a loss takes (``bioflow_targets``; default class indices)."""
    return tuple(described(loss, "bioflow_targets", default=("classes",)))
