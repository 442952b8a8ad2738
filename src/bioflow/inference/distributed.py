"""Prediction spread over processes, GPUs and nodes, on torch.distributed as training uses it.

A prediction started by ``torchrun`` (or under SLURM with one task per GPU, ``srun bioflow
predict ...``) finds its rank and world size through Lightning's cluster environments, joins one
process group (NCCL on GPUs, gloo on CPUs) and takes its share of the work: every rank computes
the same plan and the same assignment (:func:`assign`), so no messages are needed to divide the
work, only to gather the results at the end. Without such an environment, prediction runs in one
process as before.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from bioflow.errors import BioflowError

log = logging.getLogger(__name__)


def _environment():
    """The cluster environment this process was started in with several processes, else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
    elif SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and _in_srun_step():
        try:
            env = SLURMEnvironment()
        except RuntimeError as exc:  # Lightning's check of the job's srun variables
            raise BioflowError(f"SLURM: {' '.join(str(exc).split())}") from None
    else:
        return None
    return env if env.world_size() > 1 else None


def _in_srun_step() -> bool:
    """Whether this process was started by ``srun`` (a job step), not by the batch script itself:
    a batch script that runs bioflow without srun is one process, whatever the job's task count."""
    step = os.environ.get("SLURM_STEP_ID", os.environ.get("SLURM_STEPID"))
    return step is not None and step not in ("batch", "extern", "4294967294", "4294967295")


@dataclass
class Ranks:
    """This process's place among the prediction's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _group: bool = field(default=False, repr=False)

    @classmethod
    def detect(cls) -> "Ranks":
        env = _environment()
        if env is None:
            return cls()
        return cls(rank=int(env.global_rank()), world=int(env.world_size()), local_rank=int(env.local_rank()))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: str) -> str:
        """Join the process group (several processes) and return this rank's device: with
        ``cuda``, the GPU of its local rank."""
        if self.world == 1:
            return device
        import datetime

        import torch
        import torch.distributed as dist

        from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

        if device.startswith("cuda") and torch.cuda.is_available():
            device = f"cuda:{self.local_rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            env = TorchElasticEnvironment() if TorchElasticEnvironment.detect() else SLURMEnvironment()
            os.environ.setdefault("MASTER_ADDR", env.main_address)
            os.environ.setdefault("MASTER_PORT", str(env.main_port))
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=self.rank,
                                    world_size=self.world, timeout=datetime.timedelta(hours=6))
            self._group = True
        return device

    def stop(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def agree(self, failure: str | None) -> str | None:
        """The first rank's failure (a one-line message) on every rank, so that all stop together."""
        return next((f for f in self.gather(failure) if f), None)


def assign(costs: Sequence[float], world: int) -> list[int]:
    """The rank of each work item: largest first to the least-loaded rank (the same on every
    rank, since it depends on nothing but the costs)."""
    loads = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owner[i] = rank
        loads[rank] += max(float(costs[i]), 1.0)
    return owner
