"""Freed memory kept for reuse (bioflow.allocator): fewer page faults, and the user's choice wins."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bioflow import allocator

ROUNDS = r"""
import resource, sys
import numpy as np
from bioflow.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():  # like a training step: many blocks of a few MiB allocated, written, freed
    blocks = [np.ones(1 << 20, dtype=np.float32) for _ in range(40)]
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "BIOFLOW_KEEP_FREED_MEMORY": "1"}, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_kept_memory_is_reused_without_faulting_its_pages_in_again():
    default, kept = page_faults("default"), page_faults("keep")
    # 5 steps of 160 MiB: about 200 000 faults when each step's memory goes back to the system
    assert default > 50_000, default
    assert kept < default / 20, (kept, default)


@pytest.mark.parametrize("environ", [
    {"MALLOC_TRIM_THRESHOLD_": "0"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
])
def test_the_users_allocator_settings_are_left_alone(environ, monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator.user_chose_allocator(environ)
    assert allocator.keep_freed_memory(environ) is False


def test_it_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    assert not allocator.user_chose_allocator({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert allocator.keep_freed_memory({allocator.KEEP_ENV: "0"}) is False
