"""The daemon's allocator settings: freed PFN-scale arrays are reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tierd.service.allocator import keep_freed_memory

# In a fresh interpreter (the thresholds are process-wide): allocate, touch and free
# a 24 MiB array three times; print the page faults of the last two rounds.
ROUNDS = """
import resource, sys
import numpy as np
from tierd.service.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(3 << 20, dtype=np.uint64)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def faults_after_the_first_round(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_keep_freed_memory_reports_success_on_glibc() -> None:
    if not hasattr(__import__("ctypes").CDLL(None), "mallopt"):
        pytest.skip("not glibc")
    assert keep_freed_memory() is True


def test_a_freed_array_is_reused_without_faulting_its_pages_in_again() -> None:
    # glibc's defaults hand the block back (munmap, or a heap trim) and fault it in
    # again (in 4 KiB or 2 MiB pages, as THP allows); kept, it is reused as it is.
    default = faults_after_the_first_round("default")
    assert default > 0
    assert faults_after_the_first_round("keep") <= default // 10
