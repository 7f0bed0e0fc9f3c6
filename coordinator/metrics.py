"""Prometheus metrics of a coordinator (prometheus-client), on their own registry.

``grpo-coordinator serve --metrics-port P`` exposes them at ``http://host:P/metrics``. Names are
prefixed ``grpo_coordinator_``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.nodes = Gauge("grpo_coordinator_nodes", "registered nodes", registry=r)
        self.nodes_active = Gauge("grpo_coordinator_nodes_active", "nodes seen within 3 heartbeat intervals",
                                  registry=r)
        self.version = Gauge("grpo_coordinator_policy_version", "current policy version", registry=r)
        self.round = Gauge("grpo_coordinator_round", "current round", registry=r)
        self.round_samples = Gauge("grpo_coordinator_round_samples", "accepted samples in the open round", registry=r)
        self.proofs_accepted = Counter("grpo_coordinator_proofs_accepted", "accepted reward proofs (completions)",
                                       registry=r)
        self.proofs_rejected = Counter("grpo_coordinator_proofs_rejected", "rejected reward proofs by reason",
                                       ["reason"], registry=r)
        self.staleness = Histogram("grpo_coordinator_staleness_versions",
                                   "policy-version lag of heartbeats and accepted proofs", ["source"],
                                   buckets=STALENESS_BUCKETS, registry=r)
        self.bytes_served = Counter("grpo_coordinator_bytes_served", "bytes sent by streaming methods", ["method"],
                                    registry=r)
        self.bytes_received = Counter("grpo_coordinator_bytes_received",
                                      "snapshot bytes uploaded (as they arrive, refused uploads' too)", registry=r)
        self.uploads_in_flight = Gauge("grpo_coordinator_uploads_in_flight", "UploadSnapshot streams being received",
                                       registry=r)
        self.requests = Counter("grpo_coordinator_requests", "requests by method and gRPC status", ["method", "code"],
                                registry=r)
        self.snapshots_published = Counter("grpo_coordinator_snapshots_published", "snapshots published",
                                           registry=r)
        self.rounds_closed = Counter("grpo_coordinator_rounds_closed", "rounds closed", registry=r)
        self.nodes_left = Counter("grpo_coordinator_nodes_left", "heartbeats of nodes saying they are leaving",
                                  registry=r)
        self.newcomers_refused = Counter("grpo_coordinator_newcomers_refused",
                                         "what keys without verified work were refused or not logged for their "
                                         "network's spent allowance (.networks)", ["what"], registry=r)

    def serve_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return server.server_port
