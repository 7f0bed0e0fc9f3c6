"""Keep freed buffers mapped in the averager process, so that each round reuses the last round's pages.

A round allocates its parts afresh (direct reads, accumulators, encoded averages) and, with the share
audit on, keeps the received ones until the audit ends. glibc's malloc returns such memory to the
system when it is freed (4 MiB blocks are mmap-ed, or trimmed off the top of the heap), so the next
round faults every page in again and the kernel zeroes it: 0.10 s against 0.04 s for 360 MB on this
machine (bench/RESULTS.md). Fixing malloc's mmap threshold at its maximum (32 MiB: every part comes
from the heap) and not trimming the heap keeps those pages: the process stays at its peak resident
size, which every round reaches anyway. The same holds for a peak that a burst of (hostile) messages
caused — each at most the direct reads' cap (:mod:`.direct_reads`); glibc gives such memory back only
where it lies at the heap's top, so no bound is promised. ``GRPO_SWARM_KEEP_FREED_MEMORY=0`` leaves
malloc as it is (memory given back between rounds, at the cost above).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # an int: about 2 GiB of free heap top before any is given back


def keep_freed_memory() -> bool:
    """Set this process's malloc to keep freed memory (see the module docstring); False where the C
    library is not glibc (nothing is changed there) or ``GRPO_SWARM_KEEP_FREED_MEMORY=0``."""
    if os.environ.get("GRPO_SWARM_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
