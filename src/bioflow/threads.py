"""Thread counts that fit the cores bioflow was given.

PyTorch starts as many intra-op threads as the CPUs it may run on. That is one process's view: a
training job with data-loader workers, or several processes of one job on a node (torchrun, SLURM
tasks), or a container limited by a CPU quota, then runs more busy threads than cores, and threads
that wait for each other spin on cores another thread needs. bioflow chooses instead:

- the cores given: the CPUs this process may run on (affinity: ``taskset``, SLURM's binding) and,
  when lower, the cgroup's CPU quota (a container's ``--cpus``, a SLURM job's ``cpus-per-task``);
- shared by the job's processes on this node, less one core per data-loader worker (each worker
  computes with one thread, as PyTorch sets in workers);
- ``OMP_NUM_THREADS`` or ``BIOFLOW_THREADS``, when set, win (the user chose).

Waiting threads spin (OpenMP's default). On a node shared with other jobs, sleeping waits
(``OMP_WAIT_POLICY=PASSIVE``, set before bioflow starts) keep spinning threads off the cores the
others need, at a cost when the machine is quiet; bench/threads.py measures both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Set to a number to choose the intra-op threads of every bioflow process yourself.
THREADS_ENV = "BIOFLOW_THREADS"


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup's CPU quota in whole cores (rounded up), or None when there is none."""
    try:  # cgroup v2: "max 100000" or "150000 100000"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        pass
    return None


def available_cores() -> int:
    """The cores this process was given: its CPU affinity, capped by the cgroup's quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def chosen_threads(workers: int = 0, processes: int = 1) -> tuple[int, str]:
    """Intra-op threads for this process, and why: the user's ``BIOFLOW_THREADS`` or
    ``OMP_NUM_THREADS``, else the cores given shared by ``processes`` of the job on this node,
    less one per data-loader worker of this process (at least one)."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), name
    cores = available_cores()
    share = max(1, cores // max(1, int(processes)))
    threads = max(1, share - max(0, int(workers)))
    return threads, f"{cores} core(s) given, {processes} process(es), {workers} loader worker(s)"


def fit_threads(workers: int = 0, processes: int = 1) -> int:
    """Set PyTorch's intra-op threads as :func:`chosen_threads` says; returns the number."""
    import torch

    threads, _ = chosen_threads(workers, processes)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def local_processes() -> int:
    """How many processes of this job run on this node (torchrun, SLURM), 1 when alone."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1
