"""Starting a local swarm's processes as forks of one that has imported torch and transformers already.

Every ``grpo-coordinator serve`` and ``grpo-node join`` spends ~3.5 CPU-s importing torch and
transformers before it does anything; a coordinator and three nodes starting together on two cores
waited ~8 s for that in every swarm the demo, the tests and the benchmarks start. A launcher process
(``python -m grpo_swarm.node.swarm.prefork STATUS_DIR``) imports them once and forks each process
from there. The fork is set up as a fresh process would be: its own session (process group), stdio,
environment, working directory, argv, SIGINT disposition (ignored if the requesting process ignores
it, as an exec'd child would inherit), numpy's global random state reseeded, and it
exits through the interpreter's normal shutdown (atexit handlers run). hivemind is not imported before
the fork: it makes process-shared locks when imported (fork_locks.py), which two nodes must not share.

The launcher reads one JSON request a line on stdin and answers the child's pid; it reaps its children
and writes each one's wait status to ``STATUS_DIR/<pid>``, from which :class:`ForkedProcess` answers
``subprocess.Popen``'s ``poll``, ``wait`` and ``returncode``. On by default on Linux;
``GRPO_SWARM_PREFORK=0`` turns it off (each process is exec'd as before), ``=1`` on elsewhere.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PRELOAD = ("numpy", "torch", "transformers", "transformers.modeling_utils",
           "transformers.models.qwen2.modeling_qwen2", "safetensors.torch")
READY_TIMEOUT_S = 120.0
ENTRY_POINTS = {"grpo-node": "grpo_swarm.node.cli:app", "grpo-coordinator": "grpo_swarm.coordinator.cli:app"}


class ForkedProcess:
    """A process the launcher forked, with the parts of ``subprocess.Popen`` a local swarm uses."""

    def __init__(self, pid: int, status_dir: Path, args: list[str]):
        self.pid, self.args, self._status = pid, args, status_dir / str(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = os.waitstatus_to_exitcode(int(self._status.read_text()))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # (not once reaped: the pid may be another process's by then)
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    """A running launcher process: :meth:`start` forks a console script or a Python script from it."""

    def __init__(self, env: dict[str, str]):
        self.status_dir = Path(tempfile.mkdtemp(prefix="grpo-prefork-"))
        self.owner = os.getpid()  # a process forked from this one must not share its pipes
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(self.status_dir)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        if self._reply(READY_TIMEOUT_S).get("ready") is not True:
            raise RuntimeError("the prefork launcher did not start")

    def _reply(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"the prefork launcher gave no answer (exit code {self.proc.poll()})")
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, argv: list[str], *, stdout: Path, append: bool, env: dict[str, str], cwd: str | None = None,
              stderr: Path | None = None) -> ForkedProcess:
        """Fork ``argv`` (``[console script, args...]`` of this package, or ``[python, script.py, args...]``)
        with its output to ``stdout`` (and its errors there too, or to ``stderr``)."""
        for path in (stdout, stderr or stdout):
            open(path, "a" if append else "w").close()  # there once this returns, as with Popen
        request = dict(argv=list(argv), stdout=str(stdout), stderr=str(stderr or stdout), env=env,
                       cwd=cwd or os.getcwd(),  # an exec'd child inherits an ignored SIGINT from its parent
                       sigint_ignored=signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
        with self._lock:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            pid = int(self._reply(30.0)["pid"])
        return ForkedProcess(pid, self.status_dir, list(argv))

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        shutil.rmtree(self.status_dir, ignore_errors=True)


_launchers: dict[tuple, Launcher] = {}
_launchers_lock = threading.Lock()
_closing_registered = False


def launcher_for(env: dict[str, str]) -> Launcher | None:
    """This process's launcher for ``env`` (started the first time; pytest's per-test variables aside,
    the environment its imports saw is the children's), or None when turned off or it cannot start."""
    # on by default on Linux only: macOS's system libraries are not safe to use in a fork of a process
    # that loaded them (Python's multiprocessing spawns there), and Windows has no fork
    if env.get("GRPO_SWARM_PREFORK", "1" if sys.platform.startswith("linux") else "0") == "0":
        return None
    key = tuple(sorted((k, v) for k, v in env.items() if not k.startswith("PYTEST_")))
    with _launchers_lock:
        launcher = _launchers.get(key)
        if launcher is None or not launcher.alive() or launcher.owner != os.getpid():
            try:
                launcher = _launchers[key] = Launcher(env)
            except (OSError, RuntimeError) as e:
                print(f"prefork launcher unavailable ({e}); starting processes afresh", file=sys.stderr)
                return None
            global _closing_registered
            if not _closing_registered:
                atexit.register(_close_all)
                _closing_registered = True
        return launcher


def spawn(argv: list[str], *, stdout: Path, env: dict[str, str], append: bool = False, cwd: str | None = None,
          stderr: Path | None = None) -> subprocess.Popen | ForkedProcess:
    """``argv`` in a session of its own, its output to ``stdout`` (its errors there too, or to
    ``stderr``): forked from this process's launcher when it runs one of this package's console scripts
    or a Python script and the launcher is on, else exec'd."""
    forkable = Path(argv[0]).name in ENTRY_POINTS or (argv[0] == sys.executable and argv[1:2] != []
                                                       and argv[1].endswith(".py"))
    launcher = launcher_for(env) if forkable else None
    if launcher is not None:
        return launcher.start(argv, stdout=stdout, append=append, env=env, cwd=cwd, stderr=stderr)
    mode = "a" if append else "w"
    with open(stdout, mode) as out, open(stderr or os.devnull, mode) as err:  # the child keeps its own copies
        return subprocess.Popen(argv, stdout=out, stderr=err if stderr else subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def _close_all() -> None:
    for launcher in _launchers.values():
        if launcher.owner == os.getpid():
            launcher.close()
    _launchers.clear()


# -- the launcher process
def _serve(status_dir: Path) -> dict | None:
    """Fork a child for each request until stdin closes; in a child, return its request."""
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        _reap(status_dir)
        if not readable:
            continue
        data = os.read(0, 1 << 16)
        if not data:
            return None
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                return request
            os.write(1, json.dumps({"pid": pid}).encode() + b"\n")


def _reap(status_dir: Path) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        tmp = status_dir / f".{pid}"
        tmp.write_text(str(status))
        tmp.replace(status_dir / str(pid))


def _become(request: dict) -> None:
    """Turn this fork into the requested process and run it (this ends the interpreter)."""
    os.setsid()
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, fd)
        os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    # (the other dispositions are the launcher's, which Python set up as in any process: SIGPIPE ignored)
    signal.signal(signal.SIGINT, signal.SIG_IGN if request["sigint_ignored"] else signal.default_int_handler)
    import numpy as np

    np.random.seed()  # (a fresh process seeds it from the OS; forks would share the launcher's draws)
    argv = request["argv"]
    name = Path(argv[0]).name
    if name in ENTRY_POINTS:
        sys.argv = [name, *argv[1:]]
        sys.path[0] = str(Path(sys.executable).parent)  # (where a console script's own path would be)
        module, _, attr = ENTRY_POINTS[name].partition(":")
        # (click would name the program after the launcher's module, run with -m)
        sys.exit(getattr(importlib.import_module(module), attr)(prog_name=name))
    import runpy

    script = argv[1]  # [python, script.py, args...]
    sys.argv = argv[1:]
    sys.path[0] = str(Path(script).resolve().parent)
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def main() -> None:
    status_dir = Path(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (the launcher is stopped by closing its stdin)
    for module in PRELOAD:
        importlib.import_module(module)
    gc.freeze()  # the children's collections skip (and so do not copy-on-write) what is imported here
    os.write(1, b'{"ready": true}\n')
    request = _serve(status_dir)
    if request is not None:
        _become(request)


if __name__ == "__main__":
    main()
