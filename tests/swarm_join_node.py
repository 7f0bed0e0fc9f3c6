"""``grpo-node join`` whose averager misbehaves from a given round on (test-only).

    python tests/swarm_join_node.py BEHAVIOUR FIRST_ROUND MARKER join --coordinator HOST:PORT ...

The node is the real command (``grpo_swarm.node.cli``: the same round loop, view and records);
only its averager is :class:`swarm_hostile.HostileAverager`, doing ``BEHAVIOUR`` (``nan``,
``stall``, ... see tests/swarm_hostile.py) in every round from ``FIRST_ROUND`` on and honest
averaging before. ``MARKER``: the file a ``stall`` writes once it hangs mid-reduction ("" for none).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    behaviour, first, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from grpo_swarm.node.cli import app
    from grpo_swarm.node.swarm.join import SwarmPeer
    from swarm_hostile import HostileAverager

    behaviours = {r: behaviour for r in range(first, first + 10_000)}
    SwarmPeer.averager_factory = functools.partial(HostileAverager, behaviours=behaviours,
                                                   stall_marker=marker or None)
    app(sys.argv[4:], prog_name="grpo-node")


if __name__ == "__main__":
    main()
