"""The ``.part`` files of resumable snapshot downloads, and the removal of stale ones.

A download into ``dest`` writes ``<dest>.part`` (renamed to ``dest`` when complete) and, next to
it, ``<dest>.part.manifest``: the signed manifest it downloads against. The sidecar says what the
``.part`` holds (version and file) and marks it as this client's. Without it a node that skipped a
version, or gave up on one, kept that version's ``.part`` (often 0 bytes) forever; now every
download into a folder (:func:`remove_stale`) removes the ``.part`` files of *other* versions
there, and only those with a sidecar: a ``.part`` this client did not create is never touched.

A download holds an exclusive ``flock`` on its ``.part`` while it runs (:func:`lock`), and the
cleanup skips a ``.part`` it cannot lock, so a download in progress in another thread or process
keeps its file. (Where ``fcntl`` is missing, Windows, an open file cannot be deleted anyway.)
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from . import grpo_swarm_pb2 as pb

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".part.manifest"


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + PART_SUFFIX)


def sidecar_path(dest: Path) -> Path:
    return dest.with_name(dest.name + SIDECAR_SUFFIX)


def _same_file(a: pb.SnapshotManifest, b: pb.SnapshotManifest) -> bool:
    return a.snapshot.version == b.snapshot.version and a.file_sha256 == b.file_sha256


def claim(dest: Path, manifest: pb.SnapshotManifest) -> None:
    """Record (atomically) that ``<dest>.part`` is being downloaded against ``manifest``."""
    side = sidecar_path(dest)
    tmp = side.with_name(side.name + f".{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_bytes(manifest.SerializeToString())
    os.replace(tmp, side)


def release(dest: Path, *, remove_part: bool = False) -> None:
    """Forget ``dest``'s download: its sidecar, and its ``.part`` too with ``remove_part``."""
    if remove_part:
        part_path(dest).unlink(missing_ok=True)
    sidecar_path(dest).unlink(missing_ok=True)


def lock(fd: int) -> bool:
    """Take the exclusive lock of a ``.part`` file without waiting; False if another holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def remove_stale(folder: Path, keep: pb.SnapshotManifest) -> list[Path]:
    """Remove the ``.part`` files (and sidecars) in ``folder`` downloaded against another version
    or file than ``keep``, unless a download holds them; returns the removed ``.part`` paths."""
    removed = []
    for side in folder.glob("*" + SIDECAR_SUFFIX):
        recorded = pb.SnapshotManifest()
        try:
            recorded.ParseFromString(side.read_bytes())
        except Exception:  # noqa: BLE001 - not a sidecar this client wrote: leave it alone
            continue
        if _same_file(recorded, keep):
            continue
        part = side.with_name(side.name[:-len(SIDECAR_SUFFIX)] + PART_SUFFIX)
        try:
            fd = os.open(part, os.O_RDWR)
        except FileNotFoundError:
            side.unlink(missing_ok=True)  # an orphaned sidecar
            continue
        except OSError:
            continue
        try:
            if not lock(fd):
                continue  # a download in progress
            part.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
            removed.append(part)
        finally:
            os.close(fd)
    return removed
