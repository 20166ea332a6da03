"""raftfast-node's malloc settings (raftfast/heap.py): a block of a few MiB freed and
made again, as a replication frame's buffers are, is not given back to the system and faulted
in again each time."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the settings are glibc's (elsewhere keep_big_blocks_mapped changes nothing)",
)

_FAULTS = """
import resource, sys
from raftfast.heap import keep_big_blocks_mapped
assert keep_big_blocks_mapped(keep_free=int(sys.argv[1]))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = b"\\x01" * (2 << 20); del block
before = faults()
for _ in range(50):
    block = b"\\x01" * (2 << 20)  # every page written
    del block
print(faults() - before)
"""


def page_faults(keep_free: int) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, str(keep_free)], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_freed_blocks_of_a_few_mib_stay_in_the_heap():
    assert page_faults(4 << 20) < 100  # (the default keep_free)
    # What the default of 128 KiB did: the heap's top was given back and faulted in again,
    # 512 pages of 4 KiB per round.
    assert page_faults(128 << 10) > 50 * 256
