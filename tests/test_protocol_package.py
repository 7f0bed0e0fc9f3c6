"""grpo_swarm.protocol as a package: purity (no node/coordinator imports) and generated code."""

from __future__ import annotations

import ast
import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import grpo_swarm.protocol as protocol_pkg
from grpo_swarm.protocol import grpo_swarm_pb2

PROTOCOL_DIR = Path(protocol_pkg.__file__).resolve().parent
FORBIDDEN = ("grpo_swarm.node", "grpo_swarm.coordinator", "torch", "hivemind", "transformers")

PURITY_SCRIPT = """
import importlib, json, pkgutil, sys
import grpo_swarm.protocol as pkg
names = [m.name for m in pkgutil.iter_modules(pkg.__path__, "grpo_swarm.protocol.")]
for name in names:
    importlib.import_module(name)
forbidden = tuple(json.loads(sys.argv[1]))
print(json.dumps({"imported": names,
                  "forbidden": sorted(m for m in sys.modules
                                      if any(m == f or m.startswith(f + ".") for f in forbidden))}))
"""


def test_protocol_imports_no_node_or_coordinator():
    out = subprocess.run(
        [sys.executable, "-c", PURITY_SCRIPT, json.dumps(FORBIDDEN)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = {f"grpo_swarm.protocol.{m.name}" for m in pkgutil.iter_modules([str(PROTOCOL_DIR)])}
    assert set(got["imported"]) == expected
    assert {"grpo_swarm.protocol.proofs", "grpo_swarm.protocol.identity"} <= expected
    assert got["forbidden"] == [], f"protocol pulled in {got['forbidden']}"


def test_protocol_source_has_no_forbidden_imports():
    """Also lazy imports inside functions, which the runtime check cannot see."""
    for path in PROTOCOL_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name}: relative import outside the package"
                mods = [node.module or ""]
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                assert not mod.startswith(FORBIDDEN), f"{path.name} imports {mod}"


# ---- generated code ------------------------------------------------------------------------------
needs_grpc_tools = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools is not installed (pip install grpcio-tools) so the generated code cannot be rebuilt",
)


def _header_version(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("# Protobuf Python Version:"):
            return line.split(":", 1)[1].strip()
    return "?"


@needs_grpc_tools
def test_generated_descriptor_matches_proto():
    """Whatever protoc version is installed: the committed module describes the .proto exactly."""
    from google.protobuf import descriptor_pb2

    from grpo_swarm.protocol import build_proto

    fds = descriptor_pb2.FileDescriptorSet.FromString(build_proto.descriptor_set())
    assert len(fds.file) == 1
    committed = descriptor_pb2.FileDescriptorProto.FromString(grpo_swarm_pb2.DESCRIPTOR.serialized_pb)
    fresh = fds.file[0]
    for msg in fresh.message_type:  # --descriptor_set_out fills in json_name, the embedded copy omits it
        for field in msg.field:
            field.ClearField("json_name")
    assert fresh == committed, "grpo_swarm_pb2.py is stale: run python protocol/build_proto.py"


@needs_grpc_tools
def test_regeneration_is_byte_identical(tmp_path):
    from grpo_swarm.protocol import build_proto

    fresh = build_proto.generate(tmp_path).read_text(encoding="utf-8")
    committed = (PROTOCOL_DIR / "grpo_swarm_pb2.py").read_text(encoding="utf-8")
    if _header_version(fresh) != _header_version(committed):
        pytest.skip(
            f"installed grpcio-tools generates protobuf {_header_version(fresh)} code, the committed file is "
            f"{_header_version(committed)}; byte identity needs the same generator (descriptor equality is "
            "checked by test_generated_descriptor_matches_proto)"
        )
    assert fresh == committed, "grpo_swarm_pb2.py differs from a fresh build: run python protocol/build_proto.py"


def test_build_proto_fixes_absolute_imports():
    from grpo_swarm.protocol.build_proto import fix_imports

    src = "import other_pb2 as other__pb2\nfrom google.protobuf import descriptor as _descriptor\n"
    assert fix_imports(src).splitlines() == [
        "from . import other_pb2 as other__pb2",
        "from google.protobuf import descriptor as _descriptor",
    ]


def test_proto_file_is_shipped():
    assert (PROTOCOL_DIR / "grpo_swarm.proto").is_file()
    assert grpo_swarm_pb2.DESCRIPTOR.package == "grpo_swarm.v1"
    names = set(grpo_swarm_pb2.DESCRIPTOR.message_types_by_name)
    assert {"RewardProof", "ProofBatch", "PolicySnapshotRef", "RewardValue", "SignedEnvelope"} <= names
