"""node/allocator.py: after keep_freed_memory() a freed large tensor's memory stays in the process
(and is reused); without it glibc returns it to the OS. Each case runs in its own interpreter."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import sys, psutil, torch
from grpo_swarm.node.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
rss = lambda: psutil.Process().memory_info().rss
base = rss()
t = torch.ones(64 * 1024 * 1024)  # 256 MiB, written
del t
kept = rss() - base
t = torch.ones(64 * 1024 * 1024)  # served from the kept memory
print(applied, kept // (1 << 20))
"""


def run(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, kept_mib = out.stdout.split()
    return applied, int(kept_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_freed_memory_is_kept_only_when_asked():
    applied, kept = run("keep")
    assert applied == "True" and kept >= 200, kept
    applied, kept = run("default")
    assert applied == "None" and kept < 64, kept


ROUNDS = """
import json, resource, sys
import numpy as np
from grpo_swarm.node.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(2):  # an averaging round: 40 parts of 4 MiB received and kept until its end, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    parts = [np.empty(4 << 20, dtype=np.uint8) for _ in range(40)]
    for p in parts:
        p[:] = 1
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del parts
print(json.dumps({"kept": kept, "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_a_second_averaging_round_reuses_the_first_rounds_pages():
    # what the averager process does (VerifiedAverager.run): its part buffers are not faulted in again
    def rounds(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    pages = 40 * (4 << 20) // 4096
    default, kept = rounds("default"), rounds("keep")
    assert default["faults"][1] > 0.5 * pages  # freed memory went back to the system
    assert kept["kept"] is True
    assert kept["faults"][0] > 0.5 * pages and kept["faults"][1] < 0.05 * pages
