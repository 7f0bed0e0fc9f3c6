"""One running node per key: which process (instance) of a key is the running one.

A node process draws a random instance id when it starts and sends it with every Register and
Heartbeat. The newest instance a key names becomes its running node; the ones it replaced are
refused from then on (``superseded``). So a node restarted after a crash takes over at once, and a
key copied to a second machine stops the first with a message saying why, instead of one identity
sampling, averaging and publishing twice. Requests without an instance (older clients, a client
built from the .proto alone) are not checked. Kept in memory: after a coordinator restart the first
instance heard from is the running one again.
"""

from __future__ import annotations

from collections import deque

MAX_INSTANCE_BYTES = 32
SUPERSEDED_KEPT = 8  # per key: a key that names endless new instances costs this much, no more


class Instances:
    def __init__(self) -> None:
        self._running: dict[str, bytes] = {}
        self._superseded: dict[str, deque[bytes]] = {}

    def refusal(self, node_id: str, instance: bytes) -> tuple[str, str] | None:
        """Record ``instance`` as node ``node_id``'s running one and return None; or, refusing it, the
        (gRPC status, detail) to answer: a superseded instance, or one longer than MAX_INSTANCE_BYTES.
        An empty instance passes unchecked."""
        instance = bytes(instance)
        if not instance:
            return None
        if len(instance) > MAX_INSTANCE_BYTES:
            return "INVALID_ARGUMENT", f"instance must be at most {MAX_INSTANCE_BYTES} bytes"
        if instance in self._superseded.get(node_id, ()):
            return "FAILED_PRECONDITION", (
                f"superseded: node {node_id}'s key is used by another running node process now (instance "
                f"{self._running[node_id].hex()[:12]}, heard from after this one), and one key runs one node. If that "
                "was this node restarted elsewhere, stop this process; if not, another machine has this node's "
                "key: give each node its own --identity")
        running = self._running.get(node_id)
        if running != instance:
            if running is not None:
                self._superseded.setdefault(node_id, deque(maxlen=SUPERSEDED_KEPT)).append(running)
            self._running[node_id] = instance
        return None

    def running(self, node_id: str) -> bytes | None:
        return self._running.get(node_id)
