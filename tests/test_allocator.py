"""node/allocator.py: after keep_freed_memory() a freed large tensor's memory stays in the process
(and is reused); without it glibc returns it to the OS. Each case runs in its own interpreter."""

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
