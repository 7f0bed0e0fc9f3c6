"""hivemind DHTs and averagers for tests that need hivemind's own classes, started the node's way
(:func:`grpo_swarm.node.swarm.child_calls.launch_child`): hivemind's ``start=True`` waits for the child
with no limit, and a child that died or wedged while starting once hung a whole CI run."""

from __future__ import annotations

from grpo_swarm.node.swarm.child_calls import launch_child

START_LIMIT_S = 60.0


def started_dht(**kwargs):
    """``hivemind.DHT(start=True, **kwargs)``, bounded."""
    import hivemind

    return launch_child(lambda: hivemind.DHT(start=False, **kwargs), limit=START_LIMIT_S, what="DHT")


def started_averager(cls, *args, **kwargs):
    """``cls(*args, start=True, **kwargs)`` for an averager class, bounded."""
    return launch_child(lambda: cls(*args, start=False, **kwargs), limit=START_LIMIT_S, what="averager")
