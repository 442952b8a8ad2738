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

Waiting threads spin only briefly (``GOMP_SPINCOUNT=1000``, set when bioflow is imported unless
the user chose a wait policy or a spin count): with OpenMP's long default spin, threads waiting
beside another job took the cores the working ones needed. Measured on 2 cores (bench/threads.py):
StarDist 3D targets 0.62 s quiet / 2.67 s beside another job with the default, 0.55 s / 1.11 s
with the short spin; a U-Net training step 0.058 / 0.32-0.63 s against 0.060 / 0.16 s. Sleeping
at once (``OMP_WAIT_POLICY=PASSIVE``) costs about 40% on a quiet machine.

Work made of many small operations over independent items (the rays of the StarDist 3D targets)
is spread over the threads an item at a time (:func:`map_on_threads`) rather than splitting every
operation, so that a thread slowed by another job does not hold the others at each operation.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

#: Set to a number to choose the intra-op threads of every bioflow process yourself.
THREADS_ENV = "BIOFLOW_THREADS"


def spin_briefly() -> None:
    """OpenMP (GNU's, which PyTorch's CPU builds use) threads that wait spin briefly, then sleep;
    unless the user chose a wait policy or a spin count. Read when PyTorch loads OpenMP: bioflow
    sets it on import (before torch in its commands and in the processes they start).

    The same for OpenBLAS's threads (NumPy's BLAS in its wheels), unless the user chose: after
    each matrix product they spin for about 2^28 cycles by default, on the cores PyTorch's threads
    then need (a fit check's scores, a few small products per image, slowed the next image's
    prediction 2.4 times). Read when NumPy loads OpenBLAS: set here when bioflow is imported before
    NumPy, as in its commands and the processes they start."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # 2^4 cycles: waiting threads sleep at once


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


def map_on_threads(function: Callable[[T], object], items: Iterable[T]) -> None:
    """Call ``function`` on every item, spread over PyTorch's intra-op threads, one item at a time
    per thread, each thread computing with single-threaded operations.

    For many independent, similar pieces of work made of many small operations (e.g. the rays of
    the StarDist 3D targets). Splitting each operation over the threads makes every thread wait for
    the slowest at the end of each operation: beside another job, the thread that shares its core
    holds all the others. Here a thread takes the next item when it is done, so a slowed thread
    takes fewer. With one intra-op thread (a data-loader worker, ``BIOFLOW_THREADS=1``) the items
    run in order on the calling thread. The intra-op thread count is 1 while the items run and
    restored after; results go wherever ``function`` writes them (distinct items must not share
    outputs). CPU tensors only: on a GPU, call the function in a loop.
    """
    import torch

    threads = torch.get_num_threads()
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        for item in items:
            function(item)
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="bioflow-map") as pool:
            for _ in pool.map(function, items):
                pass
    finally:
        torch.set_num_threads(threads)
