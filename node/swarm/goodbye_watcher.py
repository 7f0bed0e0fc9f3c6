"""A node's goodbye when the node dies without saying one (killed, out of memory, crashed).

A node that stops cleanly tells the coordinator it is leaving (:meth:`.join.SwarmPeer.close`), and
no round waits for its work. One that dies (SIGKILL, the out-of-memory killer, a segfault in a GPU
driver) says nothing, and the open round waits for it until the coordinator counts it as gone,
3 heartbeat intervals after its last one (30 s at the default interval): every other node idles
that long. :class:`GoodbyeWatcher` starts a small process beside the node that notices its death at
once (its parent process changes; a quarter-second poll) and sends the goodbye in its place: the
same key, the same instance id, the version the node last held.

It stays silent when the node dies in a pair (at most 2 live nodes, as the coordinator last said)
holding a saved round batch (:mod:`.round_batch_file`: work accepted, its averaging not over): its
partner cannot average alone, and a restart that resumes the round saves it for both. In a larger
swarm the others average without it anyway (a member killed mid-round is left out of the retry), so
the goodbye is said and the batch dropped, as a clean stop does. It stays silent too when the node
stops cleanly (it says ``bye`` on the pipe), and when the node's instance was superseded (the
coordinator refuses the old instance's goodbye).

The watcher reads its settings (the key among them) from its stdin pipe, never from a peer, and
imports gRPC only once it has something to send. It runs in its own session, so a kill of the
node's process group leaves it alive to speak. ``GRPO_SWARM_GOODBYE_WATCHER=0`` turns it off
(bench/churn.py compares both).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

ENV = "GRPO_SWARM_GOODBYE_WATCHER"
POLL_S = 0.25
GOODBYE_TIMEOUT_S = 5.0


class GoodbyeWatcher:
    """The node's side: starts the watcher process and keeps it informed."""

    def __init__(self, proc: subprocess.Popen | None):
        self.proc = proc
        self._live: int | None = None

    @classmethod
    def off(cls) -> GoodbyeWatcher:
        """A watcher that does nothing (before the node has registered)."""
        return cls(None)

    @classmethod
    def start(cls, *, address: str, private_key_pem: bytes, coordinator_key: bytes, instance: bytes,
              round_batch: Path, version: int, live: int) -> GoodbyeWatcher:
        """A watcher for this process (off, doing nothing, with ``GRPO_SWARM_GOODBYE_WATCHER=0``)."""
        if os.environ.get(ENV, "1") == "0":
            return cls.off()
        proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
        settings = {"address": address, "key": private_key_pem.decode(), "coordinator_key": coordinator_key.hex(),
                    "instance": instance.hex(), "round_batch": str(round_batch), "version": int(version),
                    "live": int(live), "parent": os.getpid()}
        watcher = cls(proc)
        watcher._say(json.dumps(settings))
        return watcher

    def version(self, version: int) -> None:
        """The version this node now holds (its goodbye reports it)."""
        self._say(f"v {int(version)}")

    def live(self, nodes: int) -> None:
        """How many nodes the coordinator counts as live (this one included), as it last said."""
        if nodes != self._live:
            self._live = nodes
            self._say(f"live {int(nodes)}")

    def close(self) -> None:
        """This node stops cleanly (it says its own goodbye, or must not): the watcher ends silently."""
        if self.proc is None:
            return
        self._say("bye")
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.proc = None

    def _say(self, line: str) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # the watcher is gone: the node runs on, as it would without one
            self.proc = None


class _Pipe:
    """The node's lines, read as they come, while ``alive()`` says the node is there."""

    def __init__(self, fd: int):
        self.fd, self.buffered = fd, b""

    def line(self, alive) -> str | None:
        """The next line; None when the pipe ends or ``alive()`` turns false while none is buffered."""
        while b"\n" not in self.buffered:
            readable, _, _ = select.select([self.fd], [], [], POLL_S)
            if not readable:
                if not alive():
                    return None
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffered += chunk
        line, self.buffered = self.buffered.split(b"\n", 1)
        return line.decode()


def _say_goodbye(settings: dict, version: int) -> str:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from grpo_swarm.protocol.client import CoordinatorClient  # (gRPC: only once there is a goodbye to send)
    from grpo_swarm.protocol.identity import Identity

    identity = Identity(load_pem_private_key(settings["key"].encode(), password=None))
    with CoordinatorClient(settings["address"], identity, coordinator_key=bytes.fromhex(settings["coordinator_key"]),
                           instance=bytes.fromhex(settings["instance"])) as client:
        client.leave(version, timeout_s=GOODBYE_TIMEOUT_S)  # (one try)
    return identity.node_id


def main() -> int:
    pipe, started_by = _Pipe(sys.stdin.fileno()), os.getppid()
    # the settings come first (a node that died before sending them left nothing to say), then the
    # node's pid: this process's parent until the node dies, whenever this process started
    first = pipe.line(lambda: os.getppid() == started_by)
    if first is None:
        return 0
    settings = json.loads(first)
    pid, version, live = int(settings["parent"]), int(settings["version"]), int(settings["live"])
    while (line := pipe.line(lambda: os.getppid() == pid)) is not None:
        if line == "bye":
            return 0
        if line.startswith("v "):
            version = int(line[2:])
        elif line.startswith("live "):
            live = int(line[5:])
    batch = Path(settings["round_batch"])
    if batch.exists() and live <= 2:
        print(f"goodbye watcher: node process {pid} died in a pair holding its round's saved batch: no goodbye, "
              "a restart resumes the round", file=sys.stderr, flush=True)
        return 0
    started = time.monotonic()
    try:
        node_id = _say_goodbye(settings, version)
    except Exception as e:  # noqa: BLE001 - the coordinator counts the node as gone a TTL later
        print(f"goodbye watcher: node process {pid} died; could not tell the coordinator ({e}): it counts the "
              "node as gone 3 heartbeat intervals after its last one", file=sys.stderr, flush=True)
        return 1
    batch.unlink(missing_ok=True)  # its groupmates go on without it: a restart has nothing to resume
    print(f"goodbye watcher: node process {pid} died without a goodbye; told the coordinator node {node_id} "
          f"left ({time.monotonic() - started:.2f} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
