"""A reducer's one-message answer that refuses a sender's stream (BAD_GROUP_ID, CANCELLED,
PROTOCOL_VIOLATION, ...), delivered.

hivemind closes a stream as soon as its handler returns, and p2pd can drop a message still in flight
at that moment, while the sender is still sending parts: the sender then sees a clean end of the
stream instead of the refusal. What it names differs with it — an end is a failure of the reducer
(REDUCER_FAILED), BAD_GROUP_ID names nobody at first (NOT_IN_GROUP), CANCELLED passes another
member's failure on — so a lost refusal changes who the group names as the breaker of an attempt.
:func:`refuse` therefore answers, then reads the sender's input to its end (the sender ends it as
soon as it reads the refusal) for at most :data:`REFUSAL_LINGER_S` before returning.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator  # typing's, as hivemind's handlers are annotated

from hivemind.proto import averaging_pb2

REFUSAL_LINGER_S = 3.0  # an honest sender ends its input within a round trip of reading the refusal


async def refuse(answer: int | averaging_pb2.AveragingData, requests: AsyncIterator,
                 linger_s: float = REFUSAL_LINGER_S) -> AsyncIterator:
    """Yield ``answer`` (a message code, or a whole message), then drain ``requests`` until the sender
    ends its input, closes the stream, or ``linger_s`` passes."""
    yield averaging_pb2.AveragingData(code=answer) if isinstance(answer, int) else answer
    try:
        await asyncio.wait_for(_drain(requests), linger_s)
    except asyncio.TimeoutError:
        pass
    except Exception:  # noqa: BLE001 - a broken or closed stream: nothing left to protect
        pass


async def _drain(requests: AsyncIterator) -> None:
    async for _ in requests:
        pass
