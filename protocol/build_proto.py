"""Regenerate ``grpo_swarm_pb2.py`` from ``grpo_swarm.proto`` with grpcio-tools (build time only).

Usage::

    python protocol/build_proto.py            # rewrite protocol/grpo_swarm_pb2.py in place
    python protocol/build_proto.py --out DIR  # write DIR/grpo_swarm_pb2.py instead
    python protocol/build_proto.py --check    # exit 1 if the committed file is out of date

The generated module has no imports of other generated modules (the .proto imports nothing), so
it works unchanged inside the ``grpo_swarm.protocol`` package. Should a second .proto be added,
:func:`fix_imports` turns protoc's absolute ``import x_pb2`` lines into package-relative ones.

``tests/test_protocol_proofs.py`` checks that regeneration reproduces the committed file.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_FILES = ("grpo_swarm.proto",)
GENERATED = "grpo_swarm_pb2.py"


class BuildError(RuntimeError):
    pass


def protoc_version() -> str:
    """``libprotoc X.Y`` of the installed grpcio-tools; raises BuildError if it is missing."""
    try:
        import grpc_tools  # noqa: F401
    except ImportError as e:
        raise BuildError("grpcio-tools is not installed: pip install grpcio-tools") from e
    out = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "--version"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def fix_imports(source: str) -> str:
    """``import foo_pb2 as ...`` → ``from . import foo_pb2 as ...`` (protoc emits absolute imports)."""
    return re.sub(r"^import (\w+_pb2) as (\w+)$", r"from . import \1 as \2", source, flags=re.M)


def generate(out_dir: Path, proto_dir: Path = HERE) -> Path:
    """Run protoc on PROTO_FILES from ``proto_dir`` into ``out_dir``; return the generated module path."""
    protoc_version()
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out_dir}", *PROTO_FILES]
    res = subprocess.run(cmd, cwd=proto_dir, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BuildError(f"protoc failed ({res.returncode}): {res.stderr.strip()}")
    path = out_dir / GENERATED
    path.write_text(fix_imports(path.read_text(encoding="utf-8")), encoding="utf-8")
    return path


def descriptor_set(proto_dir: Path = HERE) -> bytes:
    """The FileDescriptorSet protoc builds from the .proto files (no source info)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--descriptor_set_out={out}", *PROTO_FILES]
        res = subprocess.run(cmd, cwd=proto_dir, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise BuildError(f"protoc failed ({res.returncode}): {res.stderr.strip()}")
        return out.read_bytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: next to the .proto)")
    ap.add_argument("--check", action="store_true", help="only compare with the committed file")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = generate(Path(tmp)).read_bytes()
        same = fresh == (HERE / GENERATED).read_bytes()
        print(f"{GENERATED} is {'up to date' if same else 'OUT OF DATE: run python protocol/build_proto.py'}")
        return 0 if same else 1
    path = generate(args.out or HERE)
    print(f"wrote {path} ({protoc_version()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
