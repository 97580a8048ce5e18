"""The allocator setting of the entry points: freed large blocks are reused, not re-faulted."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vebi.utils.allocator import reuse_freed_memory

PROGRAM = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from vebi.utils.allocator import reuse_freed_memory
    assert reuse_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones(2**24)  # 64 MB, above glibc's largest mmap threshold
before = faults()
for _ in range(10):
    torch.ones(2**24)
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_are_reused_instead_of_faulted_in_again() -> None:
    def page_faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
        )
        return int(done.stdout.strip())

    pages = 2**26 // 4096  # of one 64 MB block
    assert page_faults("default") > 5 * pages  # every block mapped and zeroed afresh
    assert page_faults("reuse") < pages // 4  # the same pages each time
    assert reuse_freed_memory() is True
