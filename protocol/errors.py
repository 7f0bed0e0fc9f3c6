"""Protocol errors: a stable machine-readable :class:`ReasonCode` plus a human-readable detail.

Reason codes are part of the protocol (verifiers report them, logs and tests match on them): never
rename or remove one; add new ones at the end. The value of each code is its name.
"""

from __future__ import annotations

from enum import Enum


class ReasonCode(str, Enum):
    BAD_SIGNATURE = "BAD_SIGNATURE"  # signature does not verify (or wrong length)
    UNKNOWN_KEY = "UNKNOWN_KEY"  # signer is not a known/registered peer
    BANNED_KEY = "BANNED_KEY"  # signer has been banned
    REPLAYED_SEQUENCE = "REPLAYED_SEQUENCE"  # sequence number / nonce not above the last one seen
    STALE_VERSION = "STALE_VERSION"  # policy version or snapshot hash not acceptable
    UNASSIGNED_PROMPT = "UNASSIGNED_PROMPT"  # prompt index / hash not assigned to this node and round
    REWARD_MISMATCH = "REWARD_MISMATCH"  # recomputed reward values or total differ
    ADVANTAGE_MISMATCH = "ADVANTAGE_MISMATCH"  # advantage does not follow from the group's totals
    BAD_COMPLETION = "BAD_COMPLETION"  # completion text/tokens inconsistent or invalid
    SPOT_CHECK_FAILED = "SPOT_CHECK_FAILED"  # re-computed log-probabilities disagree
    MALFORMED = "MALFORMED"  # cannot be parsed or violates the message's structural rules
    OVERSIZED = "OVERSIZED"  # message larger than the allowed size
    WRONG_RUN = "WRONG_RUN"  # run id of another run
    TIME_SKEW = "TIME_SKEW"  # timestamp too far in the past or future
    INCOMPLETE_GROUP = "INCOMPLETE_GROUP"  # a GRPO group is missing completions or has duplicates
    SAMPLING_MISMATCH = "SAMPLING_MISMATCH"  # a token is not the sampler's choice under the run's keyed noise
    GROUP_BURNED = "GROUP_BURNED"  # the group already failed a check this round: no second try
    TICKET_VOIDED = "TICKET_VOIDED"  # the node failed a check this round: nothing more counts in it

    def __str__(self) -> str:  # "BAD_SIGNATURE", not "ReasonCode.BAD_SIGNATURE"
        return self.value


class ProtocolError(Exception):
    """A message was rejected. ``code`` is a :class:`ReasonCode`, ``detail`` says what exactly."""

    def __init__(self, code: ReasonCode | str, detail: str):
        self.code = ReasonCode(code)
        self.detail = detail
        super().__init__(f"{self.code.value}: {detail}")

    def __reduce__(self):  # picklable across processes (multiprocessing, hivemind MPFuture)
        return (type(self), (self.code, self.detail))


class CoordinatorError(Exception):
    """A call the coordinator refused or that failed in transport: ``code`` is the gRPC status name."""

    def __init__(self, method: str, code: str, detail: str):
        super().__init__(f"{method}: {code}: {detail}")
        self.method, self.code, self.detail = method, code, detail
