"""One key runs one node (coordinator/instances.py): a real coordinator on loopback, clients of one
key as two node processes would be (each with its own instance id), and the raw .proto request a
client without instances sends. Two `grpo-node join` processes of one key: tests/test_swarm_join.py
(test_the_swarm_rides_out_a_coordinator_restart_and_a_copied_key_runs_its_newest_process)."""

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
