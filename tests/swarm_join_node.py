"""``grpo-node join`` whose averager misbehaves from a given round on (test-only).

    python tests/swarm_join_node.py BEHAVIOUR FIRST_ROUND MARKER join --coordinator HOST:PORT ...

The node is the real command (``grpo_swarm.node.cli``: the same round loop, view and records);
only its averager is :class:`swarm_hostile.HostileAverager`, doing ``BEHAVIOUR`` (``nan``,
``stall``, ... see tests/swarm_hostile.py) in every round from ``FIRST_ROUND`` on and honest
averaging before. ``MARKER``: the file a ``stall`` writes once it hangs mid-reduction ("" for none).

``stall_upload`` (the averager stays honest): every version this node uploads sends its header and
first chunk, then nothing for ``UPLOAD_STALL_S``, the stream held open (a broken or hostile uploader).

``hang_before_averaging`` (honest until then): in round ``FIRST_ROUND``, once the round closed with
its work (its batch saved), it writes ``MARKER`` and hangs before its gradient: a node that dies
between the close and the averaging, having sent its groupmates nothing.

``hang_while_sampling`` (honest until then): in round ``FIRST_ROUND`` it writes ``MARKER`` and hangs
while it samples, its assignment taken and nothing submitted: the test then kills it, as the
out-of-memory killer would.

``slow_sample`` (honest, only slow): from ``FIRST_ROUND`` on, sampling takes ``MARKER`` seconds more
(a slow machine, silent to the coordinator but for the background heartbeats).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


UPLOAD_STALL_S = 40.0


def stall_uploads() -> None:
    import time

    from grpo_swarm.node.swarm.participant import Participant
    from grpo_swarm.node.swarm.training_state import version_file
    from grpo_swarm.protocol import grpo_swarm_pb2 as pb
    from grpo_swarm.protocol.upload_call import DEFAULT_STALL_S

    def start_upload(self, version, sha256, *, stall_s=DEFAULT_STALL_S):
        writer = version_file(self.training_state())

        class Stalling:
            total_bytes = writer.total_bytes

            def chunk_pieces(self, chunk_size):
                for i, item in enumerate(writer.chunk_pieces(chunk_size)):
                    if i == 1:
                        time.sleep(UPLOAD_STALL_S)
                    yield item

        return self.client.start_upload_version(Stalling(), pb.PolicySnapshotRef(version=version, sha256=sha256),
                                                chunk_size=1 << 18, stall_s=stall_s)

    Participant.start_upload = start_upload


def hang_before_averaging(round_index: int, marker: Path) -> None:
    import time

    from grpo_swarm.node.swarm.join import SwarmPeer

    average = SwarmPeer._average_and_step

    def hang(self, index, *args, **kw):
        if index == round_index:
            marker.write_text("hanging")
            time.sleep(3600)
        return average(self, index, *args, **kw)

    SwarmPeer._average_and_step = hang


def hang_while_sampling(round_index: int, marker: Path) -> None:
    import time

    from grpo_swarm.node.swarm.participant import Participant

    sample = Participant.sample

    def hang(self, hb):
        if hb.current_round == round_index:
            marker.write_text("hanging")
            time.sleep(3600)
        return sample(self, hb)

    Participant.sample = hang


def slow_sampling(first_round: int, extra_s: float) -> None:
    import time

    from grpo_swarm.node.swarm.participant import Participant

    sample = Participant.sample

    def slow(self, hb):
        if hb.current_round >= first_round:
            time.sleep(extra_s)
        return sample(self, hb)

    Participant.sample = slow


def main() -> None:
    behaviour, first, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from grpo_swarm.node.cli import app
    from grpo_swarm.node.swarm.join import SwarmPeer
    from swarm_hostile import HostileAverager

    if behaviour == "hang_before_averaging":
        hang_before_averaging(first, Path(marker))
        app(sys.argv[4:], prog_name="grpo-node")
        return
    if behaviour == "hang_while_sampling":
        hang_while_sampling(first, Path(marker))
        app(sys.argv[4:], prog_name="grpo-node")
        return
    if behaviour == "slow_sample":
        slow_sampling(first, float(marker))
        app(sys.argv[4:], prog_name="grpo-node")
        return
    if behaviour == "stall_upload":
        stall_uploads()
        app(sys.argv[4:], prog_name="grpo-node")
        return
    if behaviour == "die_then_wedge":
        # its wedged step is found past its timeouts and this margin (the product's 10 s): the test's
        # own victim, so the restart test waits 7 s less; what is checked is unchanged
        from grpo_swarm.node.swarm import averaging

        averaging.STEP_MARGIN_S = 3.0
    behaviours = {r: behaviour for r in range(first, first + 10_000)}
    SwarmPeer.averager_factory = functools.partial(HostileAverager, behaviours=behaviours,
                                                   stall_marker=marker or None)
    app(sys.argv[4:], prog_name="grpo-node")


if __name__ == "__main__":
    main()
