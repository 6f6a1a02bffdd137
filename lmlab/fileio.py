"""Crash-safe file writes: write to a temporary name, fsync, rename over the target."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(*paths: Path) -> str:
    """The sha256 of the files' bytes in order (of a split's shards: the same digest as one file would have)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (the renames into it) on POSIX file systems."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
