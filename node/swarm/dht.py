"""Start this node's hivemind DHT under its own Ed25519 node key.

The DHT's libp2p identity *is* the node key (:meth:`Identity.write_libp2p_identity` writes it in
the format p2pd reads), so the peer id every groupmate sees embeds the public key the coordinator
signed tickets for: no key directory is needed to tell who sent what (see
:mod:`grpo_swarm.protocol.identity`).

:func:`start_dht` adds what hivemind leaves to the caller:

* ``check_if_identity_free=False`` — hivemind's check parses the key file as RSA and raises on an
  Ed25519 one as soon as there are initial peers;
* initial peers are checked to be full multiaddrs (``.../p2p/<peer id>``), which p2pd needs;
* addresses over UDP transports (QUIC, WebTransport, WebRTC) are refused where the user gave them
  and dropped where the coordinator listed them (:func:`check_transports`, :func:`tcp_only`): hivemind's
  p2pd cuts a stream over QUIC after a few MB, so no averaging round can complete over one (measured:
  bench/RESULTS.md, session 38);
* the initial peers are not handed to p2pd and hivemind's bootstrap: the DHT starts on its own, then
  dials every peer at once (all its addresses) and pings it, DIAL_TIMEOUT_S for the lot, and looks
  up its own neighbours through those that answered. p2pd's bootstrap waited ~5 s for a peer that
  accepts a TCP connection and never answers, and hivemind's failed as a whole on such a peer, so
  the fallback of one peer at a time cost 5 s per such peer listed before a live one (7: 52 s);
* the dials are retried with exponential back-off (a failure is not fatal: hivemind gives up after
  one try), and a DHT process that dies while dialling is replaced by a fresh one;
* a failure ends in :class:`DHTStartError` naming every peer's last error and what to check
  (addresses, open ports, NAT and ``--client-mode``);
* p2pd offers TLS 1.3 alone (:mod:`.channel_security`).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.peers import udp_transport  # (p2pd loses the ends of long streams over these)

log = logging.getLogger(__name__)

DEFAULT_HOST_MADDRS = ("/ip4/0.0.0.0/tcp/0",)

BOOTSTRAP_HINTS = (
    "Check that: (1) each initial peer address is a full multiaddr of a running node, e.g. "
    "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... (copy it from that node's log); "
    "(2) its TCP port is open in its firewall and reachable from this machine (try `nc -vz HOST PORT`); "
    "(3) if THIS machine is behind NAT or a firewall that refuses incoming connections, join with "
    "--client-mode (client_mode=True: it sends its gradients but reduces no part for others), or "
    "announce a reachable public address with announce_maddrs; "
    "(4) host_maddrs binds a free port on an interface the peers can reach."
)


DIAL_TIMEOUT_S = 5.0  # a listed peer's dial and ping (connect_peers dials them all at once)
NEIGHBOURS_TIMEOUT_S = 3.0  # a joining node's lookup of its own DHT neighbours through the peers it reached (hivemind's bootstrap_timeout)


class SenderGoneFilter(logging.Filter):
    """Drops hivemind's error, with its traceback, for a request whose sender exited before the DHT process
    read it. The request carries its reply pipe as a handle the sender's own process hands over; an
    averager stopped by Ctrl-C just after asking the DHT something is gone by then (hivemind skips the
    request either way; about one stop in five printed the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
            return True
        return not any(f.filename.endswith("resource_sharer.py") for f in traceback.extract_tb(exc.__traceback__))


def quiet_gone_senders() -> None:
    """Adds :class:`SenderGoneFilter` to hivemind's DHT logger, once (DHT processes forked later inherit it)."""
    dht_log = logging.getLogger("hivemind.dht.dht")
    if not any(isinstance(f, SenderGoneFilter) for f in dht_log.filters):
        dht_log.addFilter(SenderGoneFilter())


class DHTStartError(RuntimeError):
    """The DHT could not be started or could not reach any initial peer; the message says what to check."""


def libp2p_identity_path(identity: Identity, identity_path: str | Path | None) -> Path:
    """Where the libp2p copy of the node key goes: ``identity_path``, else next to the key file."""
    if identity_path is not None:
        return Path(identity_path).expanduser()
    if identity.path is None:
        raise ValueError("the identity has no key file: pass identity_path= for its libp2p copy")
    return Path(identity.path).with_name(Path(identity.path).name + ".libp2p")


def check_initial_peers(initial_peers: Sequence[str]) -> list[str]:
    """Initial peers as strings; ValueError naming any that lacks the ``/p2p/<peer id>`` part."""
    peers = [str(p) for p in initial_peers]
    for p in peers:
        if "/p2p/" not in p or not p.startswith("/"):
            raise ValueError(f"initial peer {p!r} is not a full multiaddr: it needs the /p2p/<peer id> part, "
                             "e.g. /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...")
    return peers


def over_udp(maddr: str) -> bool:
    """Whether ``maddr`` names a UDP transport (QUIC, WebTransport, WebRTC)."""
    return udp_transport(maddr) is not None


def check_transports(maddrs: Sequence[str] | None, what: str) -> list[str]:
    """``maddrs`` as strings; ValueError naming ``what`` and the first address over a UDP transport."""
    out = [str(m) for m in maddrs or ()]
    for m in out:
        if over_udp(m):
            raise ValueError(f"{what} {m!r} uses a UDP transport (QUIC, WebTransport or WebRTC): hivemind's p2p "
                             "daemon cuts averaging streams over QUIC after a few MB, so no round could complete. "
                             "Use a TCP address, e.g. /ip4/0.0.0.0/tcp/31337")
    return out


def tcp_only(maddrs: Sequence[str]) -> list[str]:
    """``maddrs`` without the addresses over UDP transports (a listed peer is dialled over TCP only)."""
    return [str(m) for m in maddrs if not over_udp(m)]


def start_dht(
    identity: Identity,
    *,
    identity_path: str | Path | None = None,
    initial_peers: Sequence[str] = (),
    host_maddrs: Sequence[str] = DEFAULT_HOST_MADDRS,
    announce_maddrs: Sequence[str] | None = None,
    client_mode: bool = False,
    attempts: int = 3,
    backoff_s: float = 1.0,
    max_backoff_s: float = 15.0,
    startup_timeout: float = 15.0,
    allow_udp: bool = False,
    **dht_kwargs,
):
    """A started ``hivemind.DHT`` whose peer id is ``identity``'s.

    The DHT starts on its own; with ``initial_peers`` it then dials them all at once (:func:`_dial_in_dht`),
    ``attempts`` times, ``backoff_s · 2^k`` seconds apart (capped at ``max_backoff_s``), until one answers,
    and fills its routing table through those that did. Without initial peers this node starts a new
    swarm. Extra keyword arguments go to ``hivemind.DHT`` (and from there to DHTNode and P2P), e.g.
    ``wait_timeout``.
    Raises :class:`DHTStartError` with the per-peer errors and what to check; ValueError for an
    address over a UDP transport unless ``allow_udp`` (bench/averaging.py ``--transport quic`` only:
    it measures why they are refused).
    """
    from .channel_security import prefer_tls

    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    peers = check_initial_peers(initial_peers)
    if not allow_udp:
        check_transports(peers, "initial peer")
        check_transports(host_maddrs, "host address")
        check_transports(announce_maddrs, "announce address")
    path = libp2p_identity_path(identity, identity_path)
    identity.write_libp2p_identity(path)
    kwargs = dict(host_maddrs=list(host_maddrs), identity_path=str(path), check_if_identity_free=False,
                  client_mode=client_mode, startup_timeout=startup_timeout, **dht_kwargs)
    if announce_maddrs is not None:
        kwargs["announce_maddrs"] = list(announce_maddrs)

    prefer_tls()  # (p2pd's Noise costs ~14 % more CPU than its TLS 1.3: .channel_security)
    quiet_gone_senders()
    dht = _launch(identity, kwargs, host_maddrs, startup_timeout)
    if not peers:
        return dht

    import functools

    from .child_calls import ChildSilent, run_in_dht

    last_error: dict[str, str] = {}
    relaunches = 0
    try:
        attempt = 0
        while attempt < attempts:
            if attempt:
                delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1))
                log.warning("DHT bootstrap attempt %d/%d failed; retrying in %.1f s", attempt, attempts, delay)
                time.sleep(delay)
            try:
                reached, errors = run_in_dht(dht, functools.partial(_dial_in_dht, peers, find_neighbours=True),
                                             limit=DIAL_TIMEOUT_S + NEIGHBOURS_TIMEOUT_S + 15.0)
            except ChildSilent as e:
                # the DHT's process died mid-dial (seen once in CI: SIGSEGV in the forked child): a
                # fresh process retries the same attempt, up to `attempts` times in all
                if not e.gone or relaunches >= attempts:
                    raise
                relaunches += 1
                log.warning("this node's DHT process died while dialling its initial peers (exit code %s); "
                            "starting a fresh one", dht.exitcode)
                _reap(dht)
                dht = _launch(identity, kwargs, host_maddrs, startup_timeout)
                continue
            if reached:
                return dht
            last_error.update(errors)
            attempt += 1
    except BaseException:
        _reap(dht)
        raise
    _reap(dht)
    detail = "; ".join(f"{p} -> {err}" for p, err in last_error.items())
    raise DHTStartError(f"could not join the swarm DHT through any of {len(by_peer(peers))} initial peer(s) after "
                        f"{attempts} attempt(s). Last errors: {detail}. {BOOTSTRAP_HINTS}")


def _launch(identity: Identity, kwargs: dict, host_maddrs: Sequence[str], startup_timeout: float):
    """A running ``hivemind.DHT`` (its own process and p2p daemon) on ``kwargs``, checked to be ``identity``."""
    from .child_calls import launch_child
    from .dht_shutdown import NodeDHT  # (hivemind: a heavy import, kept out of module import)

    try:
        dht = launch_child(lambda: NodeDHT(start=False, **kwargs), limit=startup_timeout + 30, what="DHT")
    except Exception as e:
        raise DHTStartError(f"could not start a DHT node on {list(host_maddrs)}: {type(e).__name__}: {e}. "
                            "Check that the port is free and the address is one of this machine's.") from e
    return _checked(dht, identity)


def _checked(dht, identity: Identity):
    import hivemind

    from .child_calls import ChildSilent, run_in_dht

    try:  # (hivemind's dht.peer_id asks the child with no timeout: a child dead by now hung the node)
        dht._peer_id = run_in_dht(dht, hivemind.DHT._get_peer_id, limit=30.0)
    except ChildSilent as e:
        _reap(dht)
        raise DHTStartError(f"the DHT process stopped answering right after it started: {e}") from e
    got = dht.peer_id.to_bytes()
    if got != identity.peer_id:
        _reap(dht)
        raise DHTStartError(f"the DHT started as peer {dht.peer_id} instead of the node key's "
                            f"{identity.peer_id_base58}: the identity file was not used")
    return dht


def _reap(dht) -> None:
    try:
        if dht.is_alive():
            dht.shutdown()
        else:
            dht.join(1.0)
    except Exception:  # noqa: BLE001 - best effort clean-up after a failed start
        pass


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def by_peer(maddrs: Sequence[str]) -> dict[str, list[str]]:
    """Full multiaddrs grouped by the peer id they end in (in first-seen order)."""
    out: dict[str, list[str]] = {}
    for text in maddrs:
        out.setdefault(str(text).rsplit("/p2p/", 1)[1], []).append(str(text))
    return out


async def _dial_in_dht(maddrs: list[str], dht, node, *, find_neighbours: bool = False) -> tuple[list[str], dict]:
    """(Runs in the DHT's process.) Dial each peer not yet connected, with all its addresses, and ping
    it so it enters the routing table; every peer at once, so that peers that never answer cost one
    DIAL_TIMEOUT_S in all, not one each. With ``find_neighbours`` (a node joining), then look up this
    node's own neighbours through them, as hivemind's bootstrap does, for at most NEIGHBOURS_TIMEOUT_S.
    Returns (the peer ids of ``maddrs`` connected now, already or newly; {address: why} for those not
    reached)."""
    import asyncio

    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    try:
        known = {info.peer_id for info in await node.p2p.list_peers()}
    except Exception as e:  # noqa: BLE001 - p2pd gone (a Ctrl-C reaches it too) or broken: nobody reached
        # (raised, hivemind would log it with a traceback; the node's checks of its daemon see it dead)
        why = f"this node's p2pd did not answer: {type(e).__name__}: {_short(e)}"
        log.info("not dialling DHT peers: %s", why)
        return [], {str(a): why for a in maddrs}
    errors: dict[str, str] = {}

    async def dial(peer: PeerID, addrs: list[str]) -> bool:
        try:
            bare = [Multiaddr(a).decapsulate(Multiaddr(f"/p2p/{peer}")) for a in addrs]
            async with asyncio.timeout(DIAL_TIMEOUT_S):
                await node.p2p._client.connect(peer, bare)
                if await node.protocol.call_ping(peer) is not None:
                    return True
            why = "connected, but it did not answer the DHT's ping"
        except TimeoutError:
            why = f"no answer within {DIAL_TIMEOUT_S:g} s"
        except Exception as e:  # noqa: BLE001 - an unreachable peer is skipped; the caller backs off
            why = f"{type(e).__name__}: {_short(e)}"
        log.info("could not reach DHT peer %s at %s: %s", peer, addrs, why)
        errors.update({a: why for a in addrs})
        return False

    todo, connected = {}, []
    for text, addrs in by_peer(maddrs).items():
        try:
            peer = PeerID.from_base58(text)
        except Exception:  # noqa: BLE001 - not a peer id: nothing to dial
            log.info("not a peer id: %r", text)
            errors.update({a: "not a peer id" for a in addrs})
            continue
        if peer in known:
            connected.append(peer)
        elif peer != node.peer_id:
            todo[peer] = addrs
    peers = list(todo)
    answers = await asyncio.gather(*(dial(p, todo[p]) for p in peers))
    reached = [p.to_base58() for p in connected] + [p.to_base58() for p, ok in zip(peers, answers) if ok]
    if find_neighbours and reached:
        try:
            async with asyncio.timeout(NEIGHBOURS_TIMEOUT_S):
                await node.find_nearest_nodes([node.node_id])
        except Exception as e:  # noqa: BLE001 - the peers reached are in the routing table already
            log.info("looking up this node's DHT neighbours: %s", _short(e))
    return reached, errors


def connect_peers(dht, maddrs: Sequence[str]) -> list[str]:
    """Join peers the coordinator lists after this DHT started (a node that started a fresh DHT
    because no peer was known yet must merge with the others): dial and ping each one not yet
    connected, all at once, over TCP only. Returns the peer ids among them connected now (already or
    newly)."""
    import functools

    from .child_calls import run_in_dht

    maddrs = tcp_only(check_initial_peers(maddrs))
    if not maddrs:
        return []
    # (past the dials' timeout and some slack the DHT process is wedged)
    return run_in_dht(dht, functools.partial(_dial_in_dht, maddrs), limit=DIAL_TIMEOUT_S + 15.0)[0]


async def _peer_ids_in_dht(dht, node) -> list[str] | str:
    try:
        return [p.peer_id.to_base58() for p in await node.p2p.list_peers()]
    except Exception as e:  # noqa: BLE001 - said in the caller's process (raised here, hivemind logs a traceback)
        return f"{type(e).__name__}: {_short(e)}"


def connected_peers(dht) -> list[str]:
    """Base58 peer ids this DHT's p2p daemon is connected to (for the live view and tests); a
    RuntimeError when the daemon does not answer (gone after a Ctrl-C, or dead)."""
    from .child_calls import run_in_dht

    peers = run_in_dht(dht, _peer_ids_in_dht, limit=10.0)
    if isinstance(peers, str):
        raise RuntimeError(f"this node's p2pd did not answer: {peers}")
    return peers


async def _visible_maddrs_in_dht(dht, node) -> list:
    return await node.get_visible_maddrs()


def visible_maddrs(dht) -> list[str]:
    """The multiaddrs this DHT's p2p daemon listens on (hivemind's get_visible_maddrs, which could
    wait forever on a DHT process killed mid-call)."""
    from .child_calls import run_in_dht

    return [str(a) for a in run_in_dht(dht, _visible_maddrs_in_dht, limit=30.0)]
