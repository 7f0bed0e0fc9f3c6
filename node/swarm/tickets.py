"""The coordinator's admission tickets as the averaging reads them: parsing and the reduction weight.

Reduction weights come from the ticket, never from what a sender claims: the verified number of
sequences (``grpo``, ``dr_grpo``) or of completion tokens (``bnpo``, ``dapo``) — see
:func:`weight_mode_for_loss`. :class:`TicketClaims` reads them through ``getattr`` so that the
fields the coordinator does not issue yet (``accepted_tokens``, ``final``) are picked up as soon
as the schema has them.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.errors import ProtocolError, ReasonCode
from grpo_swarm.protocol.hygiene import parse_request
from grpo_swarm.protocol.identity import PUBLIC_KEY_SIZE

MAX_TICKET_BYTES = 4096
WEIGHT_MODES = ("sequences", "tokens")
_LOSS_WEIGHT_MODE = {"grpo": "sequences", "dr_grpo": "sequences", "bnpo": "tokens", "dapo": "tokens"}


def weight_mode_for_loss(loss_type: str) -> str:
    """``sequences`` for grpo / dr_grpo (their step loss is a mean over sequences), ``tokens`` for
    bnpo / dapo (a mean over all completion tokens of the step); see :func:`grpo.sequence_token_weights`."""
    try:
        return _LOSS_WEIGHT_MODE[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss type {loss_type!r}; expected one of {sorted(_LOSS_WEIGHT_MODE)}") from None


@dataclass(frozen=True)
class TicketClaims:
    """What the averaging reads from a verified ticket. Fields the schema does not have yet read as
    None (``accepted_tokens``, ``final``); ``sequences`` falls back to ``accepted_samples`` (one
    sample is one completion, i.e. one sequence)."""

    run_id: str
    round_index: int
    node_public_key: bytes
    sequences: int
    tokens: int | None
    final: bool | None

    @classmethod
    def from_ticket(cls, ticket) -> TicketClaims:
        seqs = getattr(ticket, "accepted_sequences", None)
        if seqs is None:
            seqs = ticket.accepted_samples
        tokens = getattr(ticket, "accepted_tokens", None)
        final = getattr(ticket, "final", None)
        return cls(run_id=ticket.run_id, round_index=int(ticket.round_index),
                   node_public_key=bytes(ticket.node_public_key), sequences=int(seqs),
                   tokens=None if tokens is None else int(tokens), final=None if final is None else bool(final))

    def weight(self, mode: str) -> float:
        """The reduction weight in ``mode``; 0 when the ticket has no count of that kind."""
        if mode == "sequences":
            return float(self.sequences)
        if mode == "tokens":
            return float(self.tokens) if self.tokens is not None else 0.0
        raise ValueError(f"weight mode must be one of {WEIGHT_MODES}, got {mode!r}")


def parse_ticket(data: bytes, ticket_type=pb.AdmissionTicket):
    """Parse ticket bytes (no unknown fields, size-limited); ProtocolError(MALFORMED/OVERSIZED)."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(ReasonCode.MALFORMED, "ticket must be bytes")
    if len(data) > MAX_TICKET_BYTES:
        raise ProtocolError(ReasonCode.OVERSIZED, f"ticket is {len(data)} bytes > {MAX_TICKET_BYTES}")
    return parse_request(ticket_type, bytes(data), "AdmissionTicket")


def is_valid_public_key(key: bytes) -> bool:
    return isinstance(key, (bytes, bytearray)) and len(key) == PUBLIC_KEY_SIZE
