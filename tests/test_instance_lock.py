"""One running node per key and work directory (node/swarm/instance_lock.py), with real processes:
a second holder is refused and told who holds it, a node killed with -9 frees its key at once even
while a child it forked lives on, and `grpo-node join` refuses before contacting anyone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from grpo_swarm.node.swarm.instance_lock import NodeAlreadyRunning, hold

HOLDER = textwrap.dedent("""
    import multiprocessing as mp, sys, time
    from grpo_swarm.node.swarm.instance_lock import hold

    def child():
        time.sleep(60)

    with hold(sys.argv[1], sys.argv[2]):
        if sys.argv[3] == "fork":  # as a node forks its DHT and averager processes
            mp.get_context("fork").Process(target=child, daemon=False).start()
        print("held", flush=True)
        time.sleep(60)
""")


def _holder(tmp_path: Path, key: Path, workdir: Path, fork: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(key), str(workdir), "fork" if fork else "-"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _try(key: Path, workdir: Path) -> str | None:
    """None if this process could take both locks (then released), else the refusal."""
    try:
        with hold(key, workdir):
            return None
    except NodeAlreadyRunning as e:
        return str(e)


def test_a_second_node_on_the_same_key_or_workdir_is_refused_and_told_who_holds_it(tmp_path):
    key, workdir = tmp_path / "keys" / "node.key", tmp_path / "w"
    proc = _holder(tmp_path, key, workdir)
    try:
        refused = _try(key, tmp_path / "other-workdir")  # the same key elsewhere
        assert refused is not None and "using this key" in refused and f"pid {proc.pid}" in refused
        refused = _try(tmp_path / "other.key", workdir)  # the same work directory with another key
        assert refused is not None and "using this work directory" in refused and f"pid {proc.pid}" in refused
        assert _try(tmp_path / "other.key", tmp_path / "other-workdir") is None  # a node of its own
    finally:
        proc.kill()
        proc.wait(10)


def test_a_node_killed_with_minus_9_frees_its_key_at_once_though_its_child_lives_on(tmp_path):
    """Its forked children (DHT, averager) do not inherit the lock (lockf, not flock): a restart right
    after a crash is not refused while they wind down."""
    key, workdir = tmp_path / "node.key", tmp_path / "w"
    proc = _holder(tmp_path, key, workdir, fork=True)
    try:
        assert _try(key, workdir) is not None
        os.kill(proc.pid, signal.SIGKILL)  # the node alone; its child stays
        proc.wait(10)
        children = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the forked child should still be running"
        assert _try(key, workdir) is None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_join_refuses_a_key_in_use_before_contacting_anyone(tmp_path):
    key, workdir = tmp_path / "node.key", tmp_path / "w"
    proc = _holder(tmp_path, key, workdir)
    try:
        started = time.monotonic()
        res = subprocess.run([str(Path(sys.executable).parent / "grpo-node"), "join", "--coordinator", "127.0.0.1:1",
                              "--identity", str(key), "--workdir", str(tmp_path / "w2"), "--quiet"],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"})
        out = " ".join((res.stdout + res.stderr).split())
        assert res.returncode == 2, out
        assert "another grpo-node join is using this key" in out and f"pid {proc.pid}" in out
        assert "--identity" in out  # what to do
        assert time.monotonic() - started < 60
    finally:
        proc.kill()
        proc.wait(10)


def test_the_lock_is_released_when_the_block_ends(tmp_path):
    key, workdir = tmp_path / "node.key", tmp_path / "w"
    with hold(key, workdir):
        pass
    proc = _holder(tmp_path, key, workdir)  # another process takes both at once
    proc.kill()
    proc.wait(10)
