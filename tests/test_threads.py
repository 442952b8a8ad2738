"""Thread counts that fit the cores given: affinity and cgroup quota, shared by the job's processes on
a node and its data-loader workers; the user's OMP_NUM_THREADS / BIOFLOW_THREADS win."""

from __future__ import annotations

import pytest
import torch

from bioflow import threads


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "BIOFLOW_THREADS", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "150000 100000\n"}, 2),             # cgroup v2: 1.5 CPUs -> 2 cores
    ({"cpu.max": "max 100000\n"}, None),             # no quota
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_the_cgroup_quota_in_whole_cores(tmp_path, files, cores):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads.cgroup_cpu_limit(tmp_path) == cores


@pytest.mark.parametrize("cores, workers, processes, expected", [
    (8, 0, 1, 8), (8, 2, 1, 6), (8, 0, 2, 4), (8, 2, 2, 2), (2, 2, 1, 1), (2, 0, 4, 1),
])
def test_the_job_shares_the_cores_it_was_given(monkeypatch, cores, workers, processes, expected):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    assert threads.chosen_threads(workers, processes)[0] == expected


def test_the_users_choice_wins(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.chosen_threads(workers=2) == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("BIOFLOW_THREADS", "5")
    assert threads.fit_threads(workers=2) == 5 and torch.get_num_threads() == 5


def test_the_processes_of_a_job_on_a_node(monkeypatch):
    assert threads.local_processes() == 1
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    assert threads.local_processes() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's
    assert threads.local_processes() == 2


def seen_after_import(name: str, **chosen: str) -> str:
    """The value of environment variable ``name`` in a fresh process after ``import bioflow``,
    with only the variables ``chosen`` of bioflow's thread settings set beforehand."""
    import os
    import subprocess
    import sys

    ours = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT")
    env = {k: v for k, v in os.environ.items() if k not in ours}
    probe = f"import bioflow, os; print(os.environ.get({name!r}))"
    return subprocess.run([sys.executable, "-c", probe], env={**env, **chosen}, capture_output=True,
                          text=True).stdout.strip()


def test_waiting_threads_spin_briefly_unless_the_user_chose():
    assert seen_after_import("GOMP_SPINCOUNT") == "1000"
    assert seen_after_import("GOMP_SPINCOUNT", GOMP_SPINCOUNT="50") == "50"
    assert seen_after_import("GOMP_SPINCOUNT", OMP_WAIT_POLICY="PASSIVE") == "None"  # a chosen policy is left alone


def test_numpys_blas_threads_sleep_at_once_unless_the_user_chose():
    assert seen_after_import("OPENBLAS_THREAD_TIMEOUT") == "4"
    assert seen_after_import("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT="28") == "28"


def test_affinity_caps_the_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cores() == 3
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2)
    assert threads.available_cores() == 2


def test_training_with_loader_workers_leaves_them_their_cores(tmp_path, monkeypatch, caplog):
    import bioflow

    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    caplog.set_level("INFO", logger="bioflow.training.job")
    bioflow.train(["experiment=demo_unet", "trainer.max_epochs=1", "data.source.n_images=4", "data.source.shape=[64,64]",
                   "data.patch_size=[32,32]", "data.patches_per_epoch=4", "data.batch_size=2", "model.depth=1",
                   "model.base_channels=4", "data.num_workers=1", "trainer.enable_progress_bar=false",
                   "test_after_training=false", f"project_dir={tmp_path}"])
    assert torch.get_num_threads() == 3
    assert "threads: 3 per process (4 core(s) given, 1 process(es), 1 loader worker(s))" in caplog.text


def test_map_on_threads_runs_items_side_by_side_with_single_threaded_ops():
    import threading

    torch.set_num_threads(2)
    together = threading.Barrier(2, timeout=10)  # breaks unless two items run at once
    seen = {}

    def work(item):
        together.wait()
        seen[item] = (torch.get_num_threads(), threading.current_thread().name)

    threads.map_on_threads(work, [0, 1])
    assert sorted(seen) == [0, 1]
    assert {n for n, _ in seen.values()} == {1}
    assert len({name for _, name in seen.values()}) == 2
    assert torch.get_num_threads() == 2  # restored


def test_map_on_threads_stays_on_the_caller_with_one_thread_and_passes_errors_on():
    import threading

    torch.set_num_threads(1)
    names = []
    threads.map_on_threads(lambda item: names.append(threading.current_thread().name), range(3))
    assert names == [threading.current_thread().name] * 3
    torch.set_num_threads(2)

    def fail(item):
        raise ValueError(f"item {item}")

    with pytest.raises(ValueError, match="item"):
        threads.map_on_threads(fail, range(4))
    assert torch.get_num_threads() == 2


def test_3d_star_distances_do_not_depend_on_the_thread_count():
    import numpy as np

    from bioflow.data.synthetic_nuclei import synthetic_nuclei_image
    from bioflow.stardist.rays3d import golden_spiral_rays
    from bioflow.stardist.targets3d import star_distances_3d

    _, labels = synthetic_nuclei_image((16, 48, 48), seed=1, index=0, anisotropy=2.0)
    rays = golden_spiral_rays(32)
    torch.set_num_threads(1)
    one = star_distances_3d(labels, rays, grid=(1, 2, 2))
    torch.set_num_threads(2)
    two = star_distances_3d(labels, rays, grid=(1, 2, 2))
    assert one.any() and np.array_equal(one, two)
