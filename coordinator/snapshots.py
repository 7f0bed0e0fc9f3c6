"""Published policy snapshots on the coordinator's disk: files, signed manifests, retention.

Layout in ``<data-dir>/snapshots/``: ``<state-dict sha256 hex>.safetensors`` (the name
:func:`grpo_swarm.node.proving.save_snapshot` uses, so ``grpo-audit --snapshots`` can read the
folder directly) and ``<hex>.manifest`` (the signed :class:`SnapshotManifest` protobuf). A
manifest's chunk hashes are computed once, when the snapshot is published, and downloads only
read the file. :meth:`SnapshotFiles.prune` keeps the newest ``keep`` versions (never fewer than
the versions proofs may still name, η + 1).

Temporary files are written beside the snapshots and renamed into place when complete: uploads
in progress (``.upload-<node>-<version>-<pid>``, :meth:`SnapshotFiles.upload_path`), snapshots
being saved (``<hex>.tmp<pid>``, :func:`grpo_swarm.node.proving.save_snapshot`) and manifests
(``<hex>.manifest.tmp``). A process killed meanwhile leaves them behind, and nothing would ever
finish them, so :class:`SnapshotFiles` deletes them when it opens the folder (coordinator start:
one coordinator owns a data directory, so none of them can still be in use).

The state-dict hash (what proofs and the log name) is :func:`state_dict_sha256` of the tensors:
:func:`snapshot_state_sha256` reads a file and computes it (torch + safetensors); an upload in
canonical form (:mod:`grpo_swarm.protocol.version_file`) is hashed as it arrives instead, and only
:func:`check_readable` opens the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from grpo_swarm.protocol import grpo_swarm_pb2 as pb
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.proofs import now_ms
from grpo_swarm.protocol.rpc import DEFAULT_CHUNK_SIZE, file_chunk_hashes, sign_manifest

FORMAT = "safetensors"
UPLOAD_PREFIX = ".upload-"
# what an interrupted write leaves: an upload, save_snapshot's <hex>.tmp<pid>, a manifest's .tmp
_LEFTOVER = re.compile(r"^(\.upload-.*|[0-9a-f]{64}\.tmp\d+|[0-9a-f]{64}\.manifest\.tmp)$")


class SnapshotError(Exception):
    """A snapshot file is missing, unreadable or does not hash to what it claims."""


def snapshot_state_sha256(path: str | os.PathLike) -> bytes:
    """The state-dict hash of a safetensors file; SnapshotError when it is not a readable one."""
    from safetensors import SafetensorError
    from safetensors import safe_open

    from grpo_swarm.node.proving import state_dict_sha256

    class OneAtATime(Mapping):  # the file's tensors read as the hash reaches them: one in memory at a time
        def __init__(self, f):
            self.f, self.names = f, list(f.keys())

        def __getitem__(self, name):
            return self.f.get_tensor(name)

        def __iter__(self):
            return iter(self.names)

        def __len__(self):
            return len(self.names)

    try:
        with safe_open(str(path), framework="pt") as f:
            return state_dict_sha256(OneAtATime(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SnapshotError(f"{path} is not a readable safetensors file: {e}") from None


def check_readable(path: str | os.PathLike) -> None:
    """SnapshotError unless safetensors can open the file and read its tensor table (the data is
    not read)."""
    from safetensors import SafetensorError
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SnapshotError(f"{path} is not a readable safetensors file: {e}") from None


class SnapshotFiles:
    def __init__(self, directory: str | os.PathLike, identity: Identity, run_id: str,
                 chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity, self.run_id, self.chunk_size = identity, run_id, chunk_size
        self._manifests: dict[int, pb.SnapshotManifest] = {}
        self.removed_leftovers = remove_leftovers(self.dir)

    def path_for(self, sha256: bytes) -> Path:
        return self.dir / f"{bytes(sha256).hex()}.safetensors"

    def _manifest_path(self, sha256: bytes) -> Path:
        return self.dir / f"{bytes(sha256).hex()}.manifest"

    def upload_path(self, tag: str) -> Path:
        return self.dir / f"{UPLOAD_PREFIX}{tag}"

    # -- publishing
    def add(self, src: str | os.PathLike, version: int, state_sha256: bytes, *,
            chunk_hashes: tuple[list[bytes], bytes, int] | None = None) -> pb.SnapshotManifest:
        """Move ``src`` (a safetensors file whose state-dict hash the caller has checked) into the
        store as ``version``, hash its chunks (unless ``chunk_hashes``, taken with this store's chunk
        size, are given), write the signed manifest; returns the manifest. The caller logs
        ``snapshot_published`` afterwards."""
        dest = self.path_for(state_sha256)
        if Path(src) != dest:
            os.replace(src, dest)
        chunks, file_sha, size = chunk_hashes or file_chunk_hashes(dest, self.chunk_size)
        manifest = pb.SnapshotManifest(
            run_id=self.run_id, snapshot=pb.PolicySnapshotRef(version=version, sha256=bytes(state_sha256)),
            format=FORMAT, total_bytes=size, chunk_size=self.chunk_size, chunk_sha256=chunks, file_sha256=file_sha,
            time_ms=now_ms())
        sign_manifest(manifest, self.identity)
        mpath = self._manifest_path(state_sha256)
        tmp = mpath.with_name(mpath.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(manifest.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, mpath)
        self._manifests[version] = manifest
        return manifest

    def load(self, version: int, state_sha256: bytes) -> pb.SnapshotManifest | None:
        """Re-read a published version's manifest after a restart (None when its files are gone,
        e.g. pruned). A manifest whose hash or version disagrees with the log is an error."""
        mpath = self._manifest_path(state_sha256)
        if not mpath.is_file() or not self.path_for(state_sha256).is_file():
            return None
        manifest = pb.SnapshotManifest.FromString(mpath.read_bytes())
        if manifest.snapshot.sha256 != bytes(state_sha256):
            raise SnapshotError(f"{mpath} describes another snapshot")
        if manifest.snapshot.version != version:  # the same weights published again as a later version
            return self.add(self.path_for(state_sha256), version, state_sha256)
        self._manifests[version] = manifest
        return manifest

    # -- reading
    def manifest(self, version: int) -> pb.SnapshotManifest | None:
        return self._manifests.get(version)

    def versions(self) -> list[int]:
        return sorted(self._manifests)

    def file_of(self, version: int) -> Path:
        m = self._manifests[version]
        return self.path_for(m.snapshot.sha256)

    # -- retention
    def prune(self, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions; returns the versions removed."""
        versions = self.versions()
        doomed = versions[:-keep] if keep > 0 else []
        kept_hashes = {self._manifests[v].snapshot.sha256 for v in versions[-keep:]} if keep > 0 else set()
        for v in doomed:
            m = self._manifests.pop(v)
            if m.snapshot.sha256 in kept_hashes:
                continue
            for p in (self.path_for(m.snapshot.sha256), self._manifest_path(m.snapshot.sha256)):
                p.unlink(missing_ok=True)
        return doomed


def remove_leftovers(directory: str | os.PathLike) -> list[str]:
    """Delete the partial files of interrupted uploads and saves in ``directory``; their names."""
    removed = []
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False) and _LEFTOVER.match(entry.name):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(entry.name)
    return sorted(removed)
