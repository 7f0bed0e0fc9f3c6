"""The whole swarm in separate processes on loopback: `grpo-coordinator serve` and three
`grpo-node join` processes (real hivemind DHTs and verified averagers), through `grpo-node demo`'s
runner. After every round every peer holds the published version (the same bytes), the log's
rounds list the participants and their ticket weights, and `grpo-audit verify` passes."""

from __future__ import annotations

import pytest

from grpo_swarm.node.swarm.demo import run_demo
from grpo_swarm.protocol.log import read_log


@pytest.mark.slow
def test_three_nodes_average_every_round_and_publish_one_policy(tmp_path):
    result = run_demo(tmp_path / "demo", nodes=3, rounds=4, timeout_s=400, echo=lambda *_: None)
    assert result.node_exit_codes == [0, 0, 0], (tmp_path / "demo" / "logs")
    assert result.audit_ok, result.audit_problem
    records = [r for rs in result.rounds.values() for r in rs]
    assert len(records) == 12
    averaged = [r for r in records if r["averaged"]]
    assert len(averaged) >= 9, records  # a round a node joined late may be averaged without it
    assert all(r["published"] for r in averaged)
    entries = list(read_log(tmp_path / "demo" / "coordinator" / "protocol.sqlite"))
    published = [e.payload for e in entries if e.kind == "snapshot_published"][1:]
    assert len(published) >= 3
    rounds = {e.payload["round"]: e.payload for e in entries if e.kind == "round_closed"}
    for pub in published:
        r = rounds[pub["round"]]
        # everyone who held a ticket in the producing round reported the same bytes: unanimous quorum
        assert set(pub["reporters"]) == set(r["participants"]) and pub["support_weight"] == pytest.approx(1.0)
        assert set(r["weights"]) == set(r["participants"]) and sum(r["weights"].values()) == pytest.approx(1.0)
    # after the last round every node holds the last published version (resynced ones loaded it)
    last = published[-1]["version"]
    assert all(rs[-1]["version"] <= last for rs in result.rounds.values())
