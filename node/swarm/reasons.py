"""Why a member was left out of a group, accused, or failed: the reason codes of every verdict, report
and accusation in the averaging (:mod:`.verdicts` before a reduction, :mod:`.reduction` during it,
:mod:`.share_audit` after it). They travel as their string values in signed gathers and reports.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Why a slot was excluded before the reduction, or a peer banned during it."""

    # -- before the reduction (every honest member reaches the same verdict)
    MALFORMED_GATHER = "MALFORMED_GATHER"  # entry does not decode / wrong structure or types
    BAD_PEER_ID = "BAD_PEER_ID"  # not an Ed25519 peer id: no key to check the entry against
    BAD_GATHER_SIGNATURE = "BAD_GATHER_SIGNATURE"  # entry not signed by the slot's peer key
    TICKET_MALFORMED = "TICKET_MALFORMED"
    TICKET_BAD_SIGNATURE = "TICKET_BAD_SIGNATURE"  # not signed by the coordinator (forged or altered)
    TICKET_WRONG_SIGNER = "TICKET_WRONG_SIGNER"  # signed by a key that is not the coordinator's
    TICKET_WRONG_RUN = "TICKET_WRONG_RUN"
    TICKET_WRONG_ROUND = "TICKET_WRONG_ROUND"  # a ticket of another round
    TICKET_OF_ANOTHER_NODE = "TICKET_OF_ANOTHER_NODE"  # ticket key is not the slot's peer key
    TICKET_NOT_FINAL = "TICKET_NOT_FINAL"
    WRONG_ROUND = "WRONG_ROUND"  # the entry is for another round
    NO_WEIGHT = "NO_WEIGHT"  # the ticket gives no positive weight in this weight mode
    NORM_OVER_BOUND = "NORM_OVER_BOUND"  # committed gradient norm not finite or above the bound
    NOT_IN_ROUND = "NOT_IN_ROUND"  # not among the round's expected peers
    ACCUSED = "ACCUSED"  # a valid member caught it sending invalid data earlier in this round
    ACCUSES_MOST = "ACCUSES_MOST"  # its accusations name more than half of the group's other members
    ACCUSES_UNPROMPTED = "ACCUSES_UNPROMPTED"  # accusations (or a first failure) in its first attempt of the round,
    # before any attempt could have shown it anything
    UNCORROBORATED = "UNCORROBORATED"  # the sole accuser of a member: one word against another, so it is left out
    # with the member it accuses when the round can spare both
    BROKE_FIRST = "BROKE_FIRST"  # most of the others saw it fail first in the last attempt, and it names no
    # finding of its own (an abort, end or refusal with no cause: an honest member aborts only for one)
    BROKE_WITH = "BROKE_WITH"  # the peer a BROKE_FIRST member says failed first for it: one word against
    # another, so both are left out when the round can spare both
    SITS_OUT = "SITS_OUT"  # most of the others remember it breaking an earlier round (BROKE_FIRST, BROKE_WITH, or
    # named by most of the round's peers while away from the retry) and its sit-out has not run out (.sit_outs);
    # only while the round can spare it
    NOT_A_CONTRIBUTOR = "NOT_A_CONTRIBUTOR"  # declared itself auxiliary
    # -- during the reduction: invalid content (an accusation, excluded from the retry)
    BAD_COMPRESSION = "BAD_COMPRESSION"
    BAD_DTYPE = "BAD_DTYPE"
    BAD_SHAPE = "BAD_SHAPE"
    NON_FINITE = "NON_FINITE"
    MAGNITUDE = "MAGNITUDE"
    NORM_EXCEEDED = "NORM_EXCEEDED"  # parts' norm above the committed norm
    MALFORMED_PART = "MALFORMED_PART"
    NOT_A_SENDER = "NOT_A_SENDER"  # an excluded or unknown peer sent parts (refused, not counted)
    # -- during the reduction: failures (not accusations: could be a crash or an abort)
    GROUP_VIEW_MISMATCH = "GROUP_VIEW_MISMATCH"  # a groupmate holds another view of the group (its members,
    # their order, their gather entries): the leader showed us different groups (no member is to blame)
    SENDER_FAILED = "SENDER_FAILED"  # stopped, timed out or disconnected while sending
    REDUCER_FAILED = "REDUCER_FAILED"  # did not return its share (error code, timeout, disconnect)
    NOT_IN_GROUP = "NOT_IN_GROUP"  # a reducer answered BAD_GROUP_ID: it is not running this group. Once names
    # nobody as the attempt's breaker (an honest member's matchmaking can give up on a group its leader still
    # counts in; it then runs the retry) ...
    NOT_IN_GROUP_AGAIN = "NOT_IN_GROUP_AGAIN"  # ... but the same reducer answering so in this member's previous
    # attempt too is no such race: a pointer with this reason counts (see next_first_failed)
    STALLED = "STALLED"  # a failure seen first-hand as silence: a wait on it timed out while the attempt was
    # live (not an end, refusal or CANCELLED, which another member's abort also causes). Named in the next
    # gather, so that a member stalling every attempt cannot fail the round; never reported (a dropped link)
    # -- after the reduction: the share audit (see .share_audit)
    WRONG_AVERAGE = "WRONG_AVERAGE"  # its share's average fails the secret-projection check
    SKETCH_MISMATCH = "SKETCH_MISMATCH"  # its sketch differs from the parts it sent (seen by their reducer)
    SKETCH_IMPLAUSIBLE = "SKETCH_IMPLAUSIBLE"  # a sketch too large for its committed norm
    BAD_AUDIT_ENTRY = "BAD_AUDIT_ENTRY"  # malformed / wrongly signed / wrong nonce in the audit exchange
    AUDIT_WITHHELD = "AUDIT_WITHHELD"  # no reveal in time after the reduction (an accusation: silent
    # while the others wait for the seed, a reducer holding theirs would learn for free whether the rows catch it)
    SKETCH_WITHHELD = "SKETCH_WITHHELD"  # revealed its nonce, then sent no sketch in time (a failure: every share
    # is judged without it, by the best lie it could have told, so its silence hides nothing; a crash looks so)
    AUDIT_UNANSWERED = "AUDIT_UNANSWERED"  # did not answer the audit exchange with every entry though we hold
    # them all (a failure: its own entries are in; only its view of the others' is unknown)
    AUDIT_FAILED = "AUDIT_FAILED"  # outputs differing between members, or our own audit broke (a failure)

    def __str__(self) -> str:
        return self.value
