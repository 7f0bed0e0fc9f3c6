"""grpo-swarm wire protocol: messages, canonical signing bytes, identities, proofs, assignment.

Pure: imports neither :mod:`grpo_swarm.node` nor :mod:`grpo_swarm.coordinator` (nor torch or
hivemind), so verifiers can use it alone. Modules:

* :mod:`.grpo_swarm_pb2` — generated from ``grpo_swarm.proto`` (``python protocol/build_proto.py``);
* :mod:`.canonical` — the canonical signing-bytes spec;
* :mod:`.identity` — Ed25519 node keys, node ids, libp2p/hivemind identity files;
* :mod:`.proofs` — build/sign/verify/parse RewardProof, ProofBatch, SignedEnvelope;
* :mod:`.assignment` — deterministic prompt assignment;
* :mod:`.verify` — the verifier: one Verdict (reason code + detail) per GRPO group;
* :mod:`.log` — the append-only, signed, hash-chained protocol log (SQLite WAL, JSONL);
* :mod:`.audit` — run spec, log payloads, RunRecorder, replay of a whole log, reports;
  :mod:`.audit_cli` is the ``grpo-audit`` command;
* :mod:`.publication` — who may publish the next snapshot (a quorum of the producing round's
  verified work), shared by the recorder and the audit;
* :mod:`.peers` — the swarm's peers: multiaddr checks, reports against round participants and
  the ban by a majority of a round's other participants, shared by the recorder and the audit;
* :mod:`.errors` — ProtocolError and the stable ReasonCode enum;
* :mod:`.rpc` — the coordinator's gRPC API as both sides see it (method paths, limits, signed
  snapshot manifests and admission tickets); :mod:`.client` is its client (needs grpcio).
* :mod:`.hygiene` — what every request payload must satisfy besides parsing (no unknown fields,
  no uint64 above 2**63-1); :mod:`.retry` — the client's retry budget; :mod:`.partfiles` — the
  ``.part`` files of resumable downloads and their cleanup.

Model-side callables (reward recomputation, decoding, spot-check log-probabilities) are injected;
``grpo_swarm.node.proving`` provides them.
"""

from .errors import ProtocolError, ReasonCode

__all__ = ["ProtocolError", "ReasonCode"]
