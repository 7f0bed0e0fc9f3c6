"""node/swarm/memory.py: after keep_freed_memory(), a second round of the same part buffers faults in
no new pages (without it, every round faults them all in again)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

ROUND = """
import json, resource, sys
import numpy as np
from grpo_swarm.node.swarm.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(2):  # a round: 40 parts of 4 MiB received and kept until its end, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    parts = [np.empty(4 << 20, dtype=np.uint8) for _ in range(40)]
    for p in parts:
        p[:] = 1
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del parts
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _rounds(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", ROUND, mode], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_second_round_reuses_the_first_rounds_pages():
    pages = 40 * (4 << 20) // 4096
    default, kept = _rounds("default"), _rounds("keep")
    assert default["faults"][1] > 0.5 * pages  # freed memory went back to the system
    assert kept["kept"] is True
    assert kept["faults"][0] > 0.5 * pages and kept["faults"][1] < 0.05 * pages
