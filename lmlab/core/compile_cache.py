"""TorchInductor's cache of compiled kernels, and the builds in it that a stop signal cut short: Inductor's C++
compiler writes each kernel straight into the cache, so a Ctrl-C leaves it empty or cut short, and every later
compile loads it ("file too short", or vectorisation silently off). `discard_partial_builds` deletes such files,
each under Inductor's own lock of that kernel."""

from __future__ import annotations

import fcntl
import getpass
import os
import re
import struct
import tempfile
from pathlib import Path

BUILT = ("*/*.so", "*/*.o")  # what the C++ compiler writes into the cache (a kernel, an object file of one)


def inductor_cache() -> Path:
    """The folder Inductor caches in: TORCHINDUCTOR_CACHE_DIR, else TMPDIR/torchinductor_USER (its rule, in
    torch._inductor.runtime.cache_dir_utils, followed here without importing torch)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).absolute()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    return Path(tempfile.gettempdir()) / ("torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))


def whole_elf(path: Path) -> bool:
    """Whether `path` is an ELF file as long as its header says (its section headers, written last, all there)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return True  # gone meanwhile, or not ours to read: nothing to discard
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return False
    order = "<" if head[5] == 1 else ">"
    if head[4] == 2:  # 64-bit: e_shoff at 0x28, e_shentsize and e_shnum at 0x3a
        offset, = struct.unpack_from(order + "Q", head, 0x28)
        entry, count = struct.unpack_from(order + "HH", head, 0x3A)
    else:
        offset, = struct.unpack_from(order + "I", head, 0x20)
        entry, count = struct.unpack_from(order + "HH", head, 0x2E)
    return offset + entry * count <= size


def discard_partial_builds(cache: Path | None = None) -> list[Path]:
    """Delete the compiler's outputs in Inductor's cache that are not whole, skipping any a process is building
    now (its kernel's lock, CACHE/locks/KEY.lock, is held); the paths deleted."""
    cache = cache or inductor_cache()
    discarded = []
    for pattern in BUILT:
        for path in cache.glob(pattern):
            if whole_elf(path):
                continue
            key = path.name.split(".")[0]
            if _unlocked(cache / "locks" / f"{key}.lock", path):
                discarded.append(path)
    return discarded


def _unlocked(lock: Path, path: Path) -> bool:
    """Delete `path` under `lock` (Inductor's lock of its build) when no one holds the lock; whether it was."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644) if lock.parent.is_dir() else None
    except OSError:
        return False
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
        return True
    except OSError:  # held: a build under way writes it now
        return False
    finally:
        if fd is not None:
            os.close(fd)
