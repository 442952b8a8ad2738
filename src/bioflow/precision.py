"""``trainer.precision: auto``: mixed precision where the hardware computes it natively, else full.

The training step of a convolutional network is dominated by its convolutions. CPUs with AMX
(Intel Xeon since Sapphire Rapids) and GPUs since Ampere compute them in bfloat16 several times
faster than in float32; autocast keeps the weights, the optimizer and the loss in float32, so
only the convolutions' inputs are rounded. ``auto`` chooses:

* a CUDA device: ``bf16-mixed`` where the GPU supports bfloat16, else ``16-mixed``;
* a CPU with AMX: ``bf16-mixed`` (a StarDist training step: 0.11 instead of 0.19 s on one thread);
* any other CPU, or another accelerator: ``32-true`` (bfloat16 without hardware support is slower).

Validation, testing and prediction run the network in the prediction precision
(``predict.precision``: ``32-true`` by default, ``bf16-mixed``, or ``auto`` as above but never
float16), whatever the training precision, so the scores that choose the checkpoint and the
thresholds are the ones ``bioflow predict`` reproduces.
"""

from __future__ import annotations

from typing import Any, Mapping

AUTO = "auto"
#: Values of ``predict.precision`` and ``bioflow predict --precision``.
PREDICTION_PRECISIONS = ("32-true", "bf16-mixed", AUTO)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has AMX tiles (matrix units that compute bfloat16 products natively)."""
    import torch

    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # an unusual build without the check: be conservative
        return False


def device_type(accelerator: Any) -> str:
    """The device type the Trainer will use for ``accelerator`` (``cpu``, ``cuda`` or another)."""
    import torch

    name = str(accelerator).lower()
    if name in ("auto", "gpu", "cuda"):
        return "cuda" if torch.cuda.is_available() else ("cpu" if name == "auto" else name)
    return name


def auto_precision(accelerator: Any) -> str:
    """The precision ``auto`` stands for on ``accelerator``."""
    import torch

    kind = device_type(accelerator)
    if kind == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if kind == "cpu":
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "32-true"


def inference_precision(setting: Any, device_kind: str) -> str:
    """What ``predict.precision`` stands for on a device of type ``device_kind``: ``bf16-mixed``
    or ``32-true`` (``auto``: bfloat16 where the device computes it natively; float16, which can
    overflow in activations, is never chosen for prediction)."""
    value = str(setting or "32-true").lower()
    if value == AUTO:
        value = auto_precision(device_kind)
    return "bf16-mixed" if value == "bf16-mixed" else "32-true"


def inference_autocast(setting: Any, device: Any):
    """The autocast context for the network in validation, testing and prediction."""
    import torch

    kind = torch.device(device).type
    enabled = inference_precision(setting, kind) == "bf16-mixed" and kind in ("cpu", "cuda")
    return torch.autocast(device_type=kind if kind in ("cpu", "cuda") else "cpu", dtype=torch.bfloat16, enabled=enabled)


def resolve_precision(trainer: Mapping[str, Any]) -> dict[str, Any]:
    """The trainer arguments with ``precision: auto`` replaced by what it stands for here."""
    args = dict(trainer)
    if str(args.get("precision", "")).lower() == AUTO:
        args["precision"] = auto_precision(args.get("accelerator", "auto"))
    return args
