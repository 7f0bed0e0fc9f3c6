"""One key runs one node (coordinator/instances.py): a real coordinator on loopback, clients of one
key as two node processes would be (each with its own instance id), and the raw .proto request a
client without instances sends."""

from __future__ import annotations

import os

import pytest

from grpo_swarm.coordinator.instances import MAX_INSTANCE_BYTES, SUPERSEDED_KEPT, Instances
from grpo_swarm.protocol.client import CoordinatorClient, CoordinatorError
from grpo_swarm.protocol.identity import Identity

from coordinator_world import Served


def _client(s: Served, identity: Identity, instance: bytes) -> CoordinatorClient:
    return CoordinatorClient(s.address, identity, timeout_s=30, instance=instance)


def test_a_second_process_of_a_key_takes_over_and_the_first_is_told_why(tmp_path):
    s = Served(tmp_path)
    try:
        key = Identity.generate()
        first, second = _client(s, key, os.urandom(16)), _client(s, key, os.urandom(16))
        first.register()
        first.heartbeat(0, sample=False)
        second.register()  # the node restarted (or its key copied elsewhere): the newest process runs
        second.heartbeat(0, sample=False)
        for call in (lambda: first.heartbeat(0, sample=False), lambda: first.register()):
            with pytest.raises(CoordinatorError) as info:
                call()
            assert info.value.code == "FAILED_PRECONDITION" and info.value.detail.startswith("superseded")
            assert "--identity" in info.value.detail  # what to do
        second.heartbeat(0, sample=False)  # unaffected by the refused one's attempts
        third = _client(s, key, os.urandom(16))  # the second one crashed and restarted: no wait
        third.register()
        with pytest.raises(CoordinatorError, match="superseded"):
            second.heartbeat(0, sample=False)
        # a client without instances (older, or built from the .proto alone) is not checked
        bare = _client(s, key, b"")
        bare.register()
        bare.heartbeat(0, sample=False)
        third.heartbeat(0, sample=False)  # and does not take over
        other = _client(s, Identity.generate(), os.urandom(16))  # another key is another node
        other.register()
        third.heartbeat(0, sample=False)
        with pytest.raises(CoordinatorError) as info:
            _client(s, key, b"x" * (MAX_INSTANCE_BYTES + 1)).heartbeat(0, sample=False)
        assert info.value.code == "INVALID_ARGUMENT"
    finally:
        s.stop()


def test_a_key_naming_endless_instances_costs_a_bounded_memory():
    instances = Instances()
    ids = [os.urandom(16) for _ in range(100)]
    for i in ids:
        assert instances.refusal("n1", i) is None
    assert instances.running("n1") == ids[-1]
    assert len(instances._superseded["n1"]) == SUPERSEDED_KEPT
    assert instances.refusal("n1", ids[-2]) is not None  # recent ones stay refused
    assert instances.refusal("n2", ids[-2]) is None  # per key


def test_a_join_whose_key_starts_on_another_machine_stops_and_says_why(tmp_path):
    """Two `grpo-node join` processes of one key (copied to another work directory, as to another
    machine: this machine's lock, node/swarm/instance_lock.py, would refuse the same key file): the
    second takes over, the first exits 1 saying why and what to do, and the second goes on."""
    import shutil
    import time

    from grpo_swarm.node.swarm.demo import LocalSwarm

    def wait_for(condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s (logs: {swarm.logs})"
            time.sleep(0.5)

    with LocalSwarm(tmp_path / "swarm", nodes=1) as swarm:
        swarm.start_coordinator()
        first = swarm.start_node(0)
        joined = lambda i: "joined run" in (swarm.logs / f"node{i}.log").read_text()  # noqa: E731
        wait_for(lambda: joined(0), 240, "the first process joining")
        swarm.workdir(1).mkdir(parents=True)
        shutil.copy(swarm.workdir(0) / "node.key", swarm.workdir(1) / "node.key")
        second = swarm.start_node(1)
        assert first.wait(timeout=180) == 1
        log = " ".join((swarm.logs / "node0.log").read_text().split())
        assert "stopped: superseded" in log and "--identity" in log
        wait_for(lambda: joined(1), 120, "the second process joining")
        assert second.poll() is None
