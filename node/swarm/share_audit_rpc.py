"""The share audit over the averager's p2p connection: its steps after a reduction and its RPC.

:class:`ShareAuditRPC` is mixed into :class:`.averaging.VerifiedAverager` and runs in its background
process: :meth:`~ShareAuditRPC._audit_shares` reveals this member's nonce, sketches what it sent and
received (:mod:`.share_sketch`), exchanges the signed sketches with the group and judges every
reducer (:func:`.share_audit.judge`); ``rpc_share_audit`` is the handler the exchanges call
(entries relayed by reducing members for client-mode ones). The protocol, its entries and the
verdicts are in :mod:`.share_audit`.

It uses the averager's ``identity``, ``peer_id``, ``prefix``, ``_p2p``, ``request_timeout``,
``audit_timeout``, ``_rules``, ``_audit_secret``, ``_audit_stores``, ``_background_calls``,
``_last_audit``, ``_gone_peers``, ``_audit_waiting`` and ``_running_groups``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import Float16Compression
from hivemind.p2p import P2PContext, PeerID

from grpo_swarm.protocol import grpo_swarm_pb2 as pb

from .group_plan import GroupPlan
from .reduction import VerifiedAllReduceRunner
from .share_audit import (
    AUDIT_POLL_S,
    AUDIT_WAITING_S,
    MAX_AUDIT_ENTRY_BYTES,
    PHASE_REVEAL,
    PHASE_SKETCH,
    AuditEntryError,
    AuditStore,
    Findings,
    Sender,
    audit_seed,
    check_reveal,
    check_sketch_body,
    encode_entry,
    judge,
    nonce_for,
    sketch_body,
)
from .share_sketch import Projection, ShareLayout, always_audited, flat_views, sketch_parts, sketch_share
from .reasons import Reason

logger = logging.getLogger(__name__)


class ShareAuditRPC:
    """The averager's share-audit steps and RPC handler (see the module docstring)."""

    async def _audit_shares(self, group_info: GroupInfo, plan: GroupPlan, runner: VerifiedAllReduceRunner,
                            inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                            seconds: dict[str, float]) -> Findings:
        """Reveal, sketch and judge; never raises (a failure is a finding). ``seconds`` gets each step's time."""
        found = Findings()
        clock = time.monotonic()

        def lap(step: str) -> None:
            nonlocal clock
            now = time.monotonic()
            seconds[step] = round(now - clock, 4)
            clock = now

        group_id, me = group_info.group_id, self.peer_id.to_bytes()
        deadline = asyncio.get_event_loop().time() + self.audit_timeout
        senders = [Sender(p.to_bytes(), float(w), plan.verdict(p).committed_norm)
                   for p, w in zip(runner.sender_peer_ids, runner.weights)]
        keys = {v.peer_id: v.public_key for v in plan.contributors}
        servers = plan.audit_servers(self.peer_id)
        if not self.client_mode:  # the others read our entries until their own deadline: see _linger_for_audits
            self._last_audit = (group_id, frozenset(keys) - {me},
                                deadline + self.request_timeout + AUDIT_POLL_S)
        try:
            nonce = nonce_for(self._audit_secret, self._rules.round_index, plan.verdict(self.peer_id).attempt)
            reveals = await self._exchange(group_id, PHASE_REVEAL, nonce, keys, servers, deadline, found)
            lap("reveal")
            nonces = []
            for s in senders:
                if s.peer_id in reveals:
                    try:
                        nonces.append(check_reveal(reveals[s.peer_id], plan.verdict(PeerID(s.peer_id)).nonce_commitment))
                    except AuditEntryError as e:
                        found.accuse(s.peer_id, Reason.BAD_AUDIT_ENTRY, str(e))
            if found.accused or len(nonces) < len(senders):
                return found  # no seed without every nonce (a silent member was accused above)
            seed = audit_seed(runner.group_id, nonces)  # hivemind's id and the digest of the group's view
            # drawn in a thread (SHAKE-256 of a few MB): the loop keeps answering the others' audit calls
            projections = await asyncio.get_event_loop().run_in_executor(
                None, self._draw_projections, runner.layout, seed, plan.audit_fraction)
            computed = await asyncio.get_event_loop().run_in_executor(
                None, self._sketch_round, runner, projections, inputs, outputs)
            mine, my_outputs, output_norms = computed
            lap("sketch")
            bodies = await self._exchange(group_id, PHASE_SKETCH, sketch_body(mine, my_outputs), keys, servers,
                                          deadline, found)
            lap("exchange")
            sketches = {}
            for s in senders:
                if s.peer_id in bodies:
                    try:
                        sketches[s.peer_id] = check_sketch_body(bodies[s.peer_id], runner.group_size)
                    except AuditEntryError as e:
                        found.accuse(s.peer_id, Reason.BAD_AUDIT_ENTRY, str(e))
            if found.accused:
                return found
            # judged even with a sketch missing (.share_audit.judge: by the best lie its sender could
            # have told), so that silence after the reveal spares no reducer the verdict
            numels = [runner.layout.numel(j) for j in range(runner.layout.num_shares)]
            verdict = await asyncio.get_event_loop().run_in_executor(None, functools.partial(
                judge, me=me, senders=senders, reducers=[p.to_bytes() for p in plan.peer_ids],
                share_numels=numels, my_outputs=my_outputs, output_norms=output_norms, sketches=sketches,
                received=functools.partial(self._received_sketches, runner, projections),
                fp16_output=isinstance(runner.output_compression, Float16Compression)))
            found.accused.update(verdict.accused)
            found.failed.update(verdict.failed)
            lap("judge")
        except Exception as e:  # noqa: BLE001 - our own failure: the attempt fails, nobody is accused
            logger.warning("the share audit failed", exc_info=True)
            found.fail(me, Reason.AUDIT_FAILED, f"{type(e).__name__}: {e}"[:300])
        return found

    @staticmethod
    def _draw_projections(layout: ShareLayout, seed: bytes, fraction: float) -> list[Projection | None]:
        """Each share's secret projection for ``seed`` (None for an empty share)."""
        return [Projection.draw(seed, j, layout.rows[j], fraction=fraction, always=always_audited(layout, j))
                if layout.numel(j) else None for j in range(layout.num_shares)]

    def _sketch_round(self, runner: VerifiedAllReduceRunner, projections: Sequence[Projection | None],
                      inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]):
        """This member's sketches (runs in a thread): of what it sent to each share, of each share's
        average, and each share's average norm."""
        layout = runner.layout
        ins, outs = flat_views(inputs), flat_views(outputs)
        local = runner.ordered_peer_ids.index(runner.peer_id)
        # what each reducer decoded, not the raw values: with fp16 the same rounding, redone here; with
        # 8-bit (bucket means of a whole part) the parts as sent, kept by the runner
        lossy = runner.sent_parts is not None
        rounded = isinstance(runner.compression, Float16Compression)
        # the averages in a second thread while this one does the inputs (the products release the GIL)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(lambda: [sketch_share(layout, j, outs, p) if p is not None else None
                                           for j, p in enumerate(projections)])
            mine = [None if p is None else
                    sketch_parts(layout, j, runner.sent_values(j), p) if lossy and j != local else
                    sketch_share(layout, j, ins, p, through_fp16=rounded and j != local) for j, p in enumerate(projections)]
            my_outputs = pending.result()
        # float32 norms of each averaged part as received (ours: as decoded), squares summed in float64
        return mine, my_outputs, [runner.output_norm(j) for j in range(layout.num_shares)]

    @staticmethod
    def _received_sketches(runner: VerifiedAllReduceRunner, projections: Sequence[Projection | None]
                           ) -> dict[bytes, tuple[np.ndarray, float]] | None:
        """For our own share, the sketch and norm of what each remote sender sent us (:func:`judge`
        asks for it only when our share does not add up)."""
        local = runner.ordered_peer_ids.index(runner.peer_id)
        if projections[local] is None or runner.tensor_part_reducer.received is None:
            return None
        received = {}
        for sender in runner.sender_peer_ids:
            got = runner.received_parts(sender)
            if got is not None:
                parts, norm = got
                received[sender.to_bytes()] = (sketch_parts(runner.layout, local, parts, projections[local]), norm)
        return received

    async def _exchange(self, group_id: bytes, phase: int, body, keys: dict[bytes, bytes], servers: Sequence[PeerID],
                        deadline: float, found: Findings) -> dict[bytes, object]:
        """Every contributor's body for ``phase`` as this member holds it (the first valid entry of
        each). We push ours to every member that accepts calls (``servers``,
        :meth:`.group_plan.GroupPlan.audit_servers`: not client-mode ones) and read what each holds,
        until we hold every entry and every server has answered with every entry. A call returns as soon as the
        callee holds every entry (long poll); a call made again carries the entries the callee lacked
        in its last answer (a client-mode member's entries reach the others only that way), and
        entries pushed to us wake us at once, so nobody sleeps on a timer.

        Reading every reducer's whole view is what makes equivocation visible: a member that signs
        two different entries (a framing sketch for some members, the honest one for the reducer it
        frames) is seen doing so by whoever reads both, and accused (BAD_AUDIT_ENTRY); no member
        judges a reducer on entries that reducer did not hold too. A contributor whose reveal is still
        missing at ``deadline`` is accused (AUDIT_WITHHELD): without it nobody has the seed, while the
        silent member may hold everyone else's and know whether the rows would catch it. A missing
        sketch is a failure (SKETCH_WITHHELD): the shares are judged without it (.share_audit.judge).
        Once we hold every entry, servers get ``request_timeout + AUDIT_POLL_S`` more (even past the
        deadline: an entry held back to the last moment must not frame them) to answer with every
        entry; one that does not has failed (AUDIT_UNANSWERED). A missing entry or answer of a peer
        the node learned has left the round (``_gone_peers``: the coordinator heard its goodbye, or
        it samples the next round) is waited for one call more (``request_timeout + AUDIT_POLL_S``),
        not until the deadline."""
        loop = asyncio.get_event_loop()
        entry = encode_entry(self.identity, group_id, phase, body)
        store = self._audit_store(group_id, phase, create=True)
        store.expect(keys)
        store.add(entry)
        me = self.peer_id.to_bytes()
        held_by: dict[PeerID, set[bytes]] = {}  # the signers each reducer's last answer held

        def answered() -> set[PeerID]:  # reducers whose last answer held every contributor's entry
            return {p for p, signers in held_by.items() if keys.keys() <= signers}

        async def call(peer: PeerID, delay: float):
            await asyncio.sleep(delay)
            relayed = [raw for signer, (raw, _, _) in list(store.first.items())
                       if signer != me and signer not in held_by.get(peer, keys.keys())]
            request = pb.ShareAuditExchange(group_id=group_id, phase=phase, entries=[entry, *relayed])
            try:
                stub = type(self).get_stub(self._p2p, peer, namespace=self.prefix)
                response = await asyncio.wait_for(stub.rpc_share_audit(request), self.request_timeout + AUDIT_POLL_S)
                held_by[peer] = {store.add(bytes(raw)) for raw in response.entries[: 2 * len(keys)]}
            except Exception as e:  # noqa: BLE001 - unreachable now: called again until the deadline
                logger.debug(f"share audit exchange with {peer} failed: {e!r}")
            return peer

        # every server is called at least once (the call carries our entry to it); a call that
        # returns without every entry is made again; we stop once every entry and every answer is in
        calls = {asyncio.ensure_future(call(p, 0.0)) for p in servers}
        complete_at = gone_at = None
        started = loop.time()
        try:
            while True:
                now = loop.time()
                if store.complete():
                    complete_at = now if complete_at is None else complete_at
                    if answered() >= set(servers):
                        break
                limit = deadline if complete_at is None else max(deadline, complete_at + self.request_timeout + AUDIT_POLL_S)
                awaited = set(keys) - set(store.first) if complete_at is None else \
                    {p.to_bytes() for p in set(servers) - answered()}
                # (the node asks the coordinator who left only while this is set: see averaging._gone_teller)
                self._audit_waiting.value = bool(awaited) and now - started >= AUDIT_WAITING_S
                if awaited and awaited <= self._gone_peers:  # (only peers known gone are still awaited)
                    # one call's time more: a member that finished and moved on left its entries with the servers
                    gone_at = now if gone_at is None else gone_at
                    limit = min(limit, gone_at + self.request_timeout + AUDIT_POLL_S)
                if now >= limit:
                    for peer in set(keys) - set(store.first):
                        why = "it left the round" if peer in self._gone_peers else f"{self.audit_timeout} s"
                        if phase == PHASE_REVEAL:
                            found.accuse(peer, Reason.AUDIT_WITHHELD, f"no reveal within {why}")
                        else:
                            found.fail(peer, Reason.SKETCH_WITHHELD, f"revealed its nonce, then no sketch within {why}")
                    for peer in set(servers) - answered() if complete_at is not None else ():
                        found.fail(peer.to_bytes(), Reason.AUDIT_UNANSWERED, f"did not answer the audit exchange "
                                                                             f"(phase {phase}) with every entry")
                    break
                store.changed.clear()
                changed = asyncio.ensure_future(store.changed.wait())
                done, calls = await asyncio.wait(calls | {changed}, timeout=min(AUDIT_POLL_S, limit - now),
                                                 return_when=asyncio.FIRST_COMPLETED)
                calls.discard(changed)
                changed.cancel()
                for task in done - {changed}:
                    if task.result() not in answered():
                        calls.add(asyncio.ensure_future(call(task.result(), 0.05)))
        finally:
            self._audit_waiting.value = False
        for signer in store.equivocators():
            found.accuse(signer, Reason.BAD_AUDIT_ENTRY, f"signed two different audit entries (phase {phase})")
        for task in calls:  # (left to finish on their own: cancelling could drop an entry in flight)
            self._background_calls.add(task)
            task.add_done_callback(self._background_calls.discard)
        return store.bodies()

    def _group_senders(self, group_id: bytes) -> frozenset[bytes] | None:
        """The contributors of a group we are reducing with (None before its runner exists)."""
        future = self._running_groups.get(group_id)
        if future is None or not future.done() or future.cancelled() or future.exception() is not None:
            return None
        return frozenset(p.to_bytes() for p in future.result().sender_peer_ids)

    def _audit_store(self, group_id: bytes, phase: int, create: bool) -> AuditStore | None:
        key = (bytes(group_id), int(phase))
        store = self._audit_stores.get(key)
        if store is None and create:
            store = self._audit_stores[key] = AuditStore(group_id, phase)
            while len(self._audit_stores) > 32:
                self._audit_stores.pop(next(iter(self._audit_stores)))
        return store

    async def rpc_share_audit(self, request: pb.ShareAuditExchange, context: P2PContext) -> pb.ShareAuditExchange:
        """A groupmate's audit entry in; every entry we hold for that (group, phase) out, once we hold
        them all or after ``AUDIT_POLL_S``. Entries are kept only for groups we are in, one per
        caller (the authenticated libp2p peer), and only from the group's contributors: anyone else
        (a sybil told the group id) could otherwise crowd the answers. Before our own audit of the
        group knows its keys, only the caller's first entry is kept, unchecked; afterwards every valid
        entry a caller relays is filed by its signer (:class:`.share_audit.AuditStore`)."""
        group_id = bytes(request.group_id)
        known = group_id in self._running_groups or (group_id, request.phase) in self._audit_stores
        store = (self._audit_store(group_id, request.phase, create=known)
                 if request.phase in (PHASE_REVEAL, PHASE_SKETCH) else None)
        if store is None:
            return pb.ShareAuditExchange(group_id=request.group_id, phase=request.phase)
        members = store.expected if store.expected is not None else self._group_senders(group_id)
        caller = context.remote_id.to_bytes()
        if request.entries and members and caller in members:
            # the caller's own entry first, then (once we know the group's keys) entries it relays
            for raw in request.entries[: 2 * len(members)]:
                if len(raw) <= MAX_AUDIT_ENTRY_BYTES:
                    store.push(caller, bytes(raw))
        try:
            await asyncio.wait_for(store.wait_complete(), AUDIT_POLL_S)
        except asyncio.TimeoutError:
            pass
        if store.complete():
            store.served.add(caller)
        return pb.ShareAuditExchange(group_id=request.group_id, phase=request.phase,
                                     entries=store.entries())

    async def _linger_for_audits(self, limit: float) -> None:
        """Before this member leaves (its averager shuts down): wait until every other contributor of
        the last group it audited has read every sketch entry from it, for at most ``limit`` seconds
        and never past that audit's deadline. A member finishing its audit a moment after us reads our
        answers after we are done; had we left, our entries would be missing there or our answer
        (SKETCH_WITHHELD, AUDIT_UNANSWERED), its attempt would fail and it would lose its share of the
        round: seen when two members' last round ended and they exited at once."""
        if self._last_audit is None:
            return
        group_id, others, until = self._last_audit
        loop = asyncio.get_event_loop()
        end = min(until, loop.time() + limit)
        while loop.time() < end:
            store = self._audit_store(group_id, PHASE_SKETCH, create=False)
            if store is not None and others <= store.served:
                return
            await asyncio.sleep(0.05)
