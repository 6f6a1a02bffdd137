"""TorchInductor's cache of compiled kernels, and the builds in it that a stop signal cut short: Inductor's C++
compiler writes each kernel straight into the cache, so a Ctrl-C leaves it empty or cut short, and every later
compile loads it ("file too short", or vectorisation silently off). `discard_partial_builds` deletes such files
when no build is under way in the cache."""

from __future__ import annotations

import fcntl
import getpass
import os
import re
import struct
import tempfile
from contextlib import ExitStack
from pathlib import Path

from lmlab.core.fileio import ReadError, open_file

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
        with open_file(path) as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except (OSError, ReadError):
        return True  # gone meanwhile, not ours to read, or no file (a pipe): nothing to discard
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] not in (1, 2):
        return False
    order = "<" if head[5] == 1 else ">"
    # e_shoff (its size, where), then where e_shentsize and e_shnum are: 64-bit at 0x28 and 0x3a, 32-bit 0x20, 0x2e
    word, at_offset, at_sizes = ("Q", 0x28, 0x3A) if head[4] == 2 else ("I", 0x20, 0x2E)
    offset, = struct.unpack_from(order + word, head, at_offset)
    entry, count = struct.unpack_from(order + "HH", head, at_sizes)
    return offset + entry * count <= size


def discard_partial_builds(cache: Path | None = None) -> list[Path]:
    """Delete the compiler's outputs in Inductor's cache that are not whole, while no other process builds into the
    cache (holds a lock of CACHE/locks); the paths deleted. Not by each kernel's own lock: an AOTInductor build writes
    its kernels' object files under its wrapper's lock, so a file cut short now may be another process's build under
    way. While one is, nothing is deleted; the next command looks again. This process's own builds do not count: a
    stop signal abandoned them, though Inductor's compile threads, or its compile workers (processes it started, which
    the signal is ending), may still hold their locks."""
    cache = cache or inductor_cache()
    cut = [path for pattern in BUILT for path in cache.glob(pattern) if not whole_elf(path)]
    if not cut:
        return []
    holders: dict[tuple[int, int], set[int]] | None = None
    with ExitStack() as held:
        for lock in sorted((cache / "locks").glob("*.lock")):
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue  # gone meanwhile, or not ours to open: no build of ours holds it
            held.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: by a build under way, whose files may be among these, unless it is ours
                holders = _lock_holders() if holders is None else holders
                where = os.fstat(fd)
                if not all(_ours(pid) for pid in holders.get((where.st_dev, where.st_ino), {-1})):
                    return []
        discarded = [path for path in cut if not whole_elf(path)]  # its build may have ended before the locks
        for path in discarded:
            path.unlink(missing_ok=True)
        return discarded


def _ours(pid: int) -> bool:
    """Whether `pid` is this process or one of Inductor's compile workers for it: a process, or a child of one, that
    Inductor started with `--parent=` this process's id (torch._inductor.compile_worker)."""
    if pid == os.getpid():
        return True
    mark = f"--parent={os.getpid()}".encode()
    for _ in range(3):  # the sidecar Inductor starts, or a worker of its pool below it
        try:
            if mark in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return True
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
        except (OSError, ValueError, IndexError):
            return False
        if pid in (0, 1, os.getpid()):  # another child of this process's (a command it ran), or not below it
            return False
    return False


def _lock_holders() -> dict[tuple[int, int], set[int]]:
    """The processes holding a lock of each file, (device, inode), as /proc/locks lists them; none where the
    system has no such list (a lock whose holder is unknown is another process's)."""
    holders: dict[tuple[int, int], set[int]] = {}
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return holders
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":  # a process waiting for the lock, not holding it
            continue
        try:
            major, minor, inode = fields[5].split(":")
            holders.setdefault((os.makedev(int(major, 16), int(minor, 16)), int(inode)), set()).add(int(fields[4]))
        except ValueError:
            continue
    return holders
