"""The swarm: a node's coordinator side (:mod:`.participant`), its DHT and verified gradient averaging over hivemind, and the join loop."""
