"""grpo_swarm.node: everything one peer runs: models, data, rollouts, rewards, GRPO math, trainer, CLI."""

import os as _os

# A node forks its DHT and averager processes after it has used gRPC (the coordinator's client), and
# again when it restarts them mid-run. gRPC's fork handlers, on in its wheels, then either reset gRPC in
# the child (starting its threads there) or skip when another thread is in a call, leaving the child a
# gRPC caught mid-call; gRPC supports neither once the parent has channels. The children never use
# gRPC: fork them as plain copies. (Read once, when gRPC starts: so here, before anything imports it.)
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
