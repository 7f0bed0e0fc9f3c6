"""The prefork launcher (node/swarm/prefork.py): processes forked from a parent that imported torch and
transformers once behave as freshly exec'd ones — own session, output, environment, working directory,
argv, random state, SIGINT, exit codes and signals as ``subprocess.Popen`` reports them — and start
in a fraction of the time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from grpo_swarm.node.swarm.prefork import launcher_for

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    import numpy as np
    signals = {name: str(signal.getsignal(getattr(signal, name))) for name in
               ("SIGPIPE", "SIGINT", "SIGTERM", "SIGCHLD", "SIGXFSZ", "SIGHUP", "SIGUSR1")}
    print(json.dumps(dict(argv=sys.argv, cwd=os.getcwd(), sid=os.getsid(0), pid=os.getpid(), pgid=os.getpgid(0),
                          signals=signals,
                          value=os.environ.get("PREFORK_TEST"), draw=float(np.random.rand()),
                          torch="torch" in sys.modules, hivemind="hivemind" in sys.modules,
                          path0=sys.path[0])), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    mode = sys.argv[1]
    if mode == "sleep":
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
    sys.exit(int(mode))
""")


@pytest.fixture
def launcher(tmp_path):
    env = {**os.environ, "PREFORK_TEST": "launcher", "OMP_NUM_THREADS": "1"}
    found = launcher_for(env)
    assert found is not None
    return found, env


def _record(log):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines()
        if lines:
            return json.loads(lines[0]), lines
        time.sleep(0.02)
    raise AssertionError("no output")


def test_a_forked_script_is_set_up_as_a_fresh_process(tmp_path, launcher):
    launch, env = launcher
    script = tmp_path / "child.py"
    script.write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    logs = [tmp_path / f"out{i}.log" for i in range(2)]
    (logs[1]).write_text("kept\n")
    procs = [launch.start([sys.executable, str(script), "7"], stdout=logs[0], append=False,
                          env={**env, "PREFORK_TEST": "child"}, cwd=str(work)),
             launch.start([sys.executable, str(script), "0"], stdout=logs[1], append=True, env=env)]
    assert [p.wait(timeout=60) for p in procs] == [7, 0]
    first, lines = _record(logs[0])
    assert first["argv"] == [str(script), "7"] and first["cwd"] == str(work) and first["value"] == "child"
    assert first["sid"] == first["pid"] == first["pgid"] == procs[0].pid  # a session of its own
    assert first["torch"] and not first["hivemind"]  # imported before the fork; hivemind's locks are not
    assert first["path0"] == str(tmp_path) and "to stderr" in lines
    kept = logs[1].read_text().splitlines()
    second = json.loads(kept[1])
    assert kept[0] == "kept" and second["value"] == "launcher"
    assert first["draw"] != second["draw"]  # numpy's global random state reseeded in each fork
    with open(tmp_path / "fresh.log", "w") as out:  # signal dispositions as in a fresh process (SIGPIPE ignored)
        subprocess.run([sys.executable, str(script), "0"], stdout=out, stderr=subprocess.STDOUT, env=env, timeout=60)
    assert first["signals"] == _record(tmp_path / "fresh.log")[0]["signals"]


def test_signals_and_exit_codes_read_as_popens(tmp_path, launcher):
    launch, env = launcher
    script = tmp_path / "child.py"
    script.write_text(SCRIPT)
    held = signal.signal(signal.SIGINT, signal.SIG_IGN)  # (as in a shell's background job)
    try:
        deaf = launch.start([sys.executable, str(script), "sleep"], stdout=tmp_path / "d.log", append=False, env=env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sleeper = launch.start([sys.executable, str(script), "sleep"], stdout=tmp_path / "a.log", append=False, env=env)
    finally:
        signal.signal(signal.SIGINT, held)
    _record(tmp_path / "a.log")
    _record(tmp_path / "d.log")
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(timeout=0.2)
    assert sleeper.poll() is None
    for p in (deaf, sleeper):
        p.send_signal(signal.SIGINT)  # Ctrl-C: KeyboardInterrupt, as in a fresh process
    assert sleeper.wait(timeout=30) == 3 and "interrupted" in (tmp_path / "a.log").read_text()
    # a child of a process ignoring SIGINT ignores it too, as an exec'd child inherits it
    with pytest.raises(subprocess.TimeoutExpired):
        deaf.wait(timeout=1.0)
    deaf.kill()
    assert deaf.wait(timeout=30) == -signal.SIGKILL
    victim = launch.start([sys.executable, str(script), "sleep"], stdout=tmp_path / "b.log", append=False, env=env)
    _record(tmp_path / "b.log")
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    victim.kill()  # reaped: no signal goes to a pid that may be another process's now


def test_a_forked_process_is_running_its_own_code_seconds_sooner(tmp_path, launcher):
    """A script importing what a node imports first (torch, transformers' model classes): forked, its
    first line comes in a fraction of the time it takes exec'd."""
    launch, env = launcher
    script = tmp_path / "imports.py"
    script.write_text("import time, torch, transformers.modeling_utils\nprint(time.time(), flush=True)\n")

    def first_line(start) -> float:
        log = tmp_path / "t.log"
        t0 = time.time()
        proc = start(log)
        assert proc.wait(timeout=120) == 0
        return float(log.read_text().split()[0]) - t0

    def execd(log):
        with open(log, "w") as out:
            return subprocess.Popen([sys.executable, str(script)], stdout=out, env=env)

    forked = first_line(lambda log: launch.start([sys.executable, str(script)], stdout=log, append=False, env=env))
    fresh = first_line(execd)
    assert forked < fresh / 4, (forked, fresh)
