"""grpo_swarm.coordinator: the run host: a light gRPC service (config, registration, snapshots,
proof verification and admission tickets, staleness, the protocol log). See core.py and service.py."""
