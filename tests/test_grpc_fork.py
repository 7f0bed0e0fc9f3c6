"""A node forks its DHT and averager processes after it has used gRPC: gRPC's fork handlers stay off
in a node process (node/__init__.py), so each fork is a plain copy that never touches gRPC. Probed in a
fresh interpreter with a gRPC server and a call in flight in another thread, as a node's heartbeat can
be while its swarm side restarts (CI once saw a DHT child forked so die with SIGSEGV)."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = r"""
import os, sys, threading, time
if sys.argv[1] == "node":
    import grpo_swarm.node  # what every node process imports first
import grpc
from concurrent import futures

server = grpc.server(futures.ThreadPoolExecutor(2))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
done = threading.Event()

def call():
    while not done.is_set():
        try:
            channel.unary_unary("/probe/call")(b"", timeout=1)
        except grpc.RpcError:
            pass

threading.Thread(target=call, daemon=True).start()
time.sleep(0.5)
codes = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
done.set()
print("children", codes)
"""


def _probe(mode: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "children [7, 7, 7, 7, 7, 7, 7, 7]" in out.stdout, (out.stdout, out.stderr)
    return out.stderr


def test_a_node_process_forks_without_grpcs_fork_handlers():
    assert "fork() handlers" not in _probe("node")
    # the same process without the node's setting: gRPC's handlers run at every fork, and skip while
    # the other thread is in its call ("Other threads are currently calling into gRPC, skipping fork()
    # handlers", as the CI run's log showed before the DHT child died)
    assert "fork() handlers" in _probe("plain")
