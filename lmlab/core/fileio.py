"""Crash-safe file writes, write failures as one sentence, the one reader of files lmlab did not write, and the room
this machine has."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import psutil

from lmlab.core.errors import UserError


def sha256_file(*paths: Path) -> str:
    """The sha256 of the files' bytes in order, the same digest as one file would have."""
    digest = hashlib.sha256()
    for path in paths:
        with open_file(path) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """Persist a file's bytes, or a directory's entries (the renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NAME_BYTES = 200  # the longest folder name taken: the file systems' 255, less what lock and temporary names add


def _name_problem(name: str) -> str | None:
    """Why `name` cannot name a folder lmlab makes, or None. A space would split the commands lmlab prints to
    paste."""
    if not name:
        return "is empty"
    if any(not c.isprintable() for c in name):
        return "holds a control character (a line break, a tab, ...)"
    if any(c.isspace() for c in name):
        return "holds a space"
    size = len(name.encode("utf-8", "surrogateescape"))
    return f"is {size:,} bytes long, more than the {NAME_BYTES} a name may be" if size > NAME_BYTES else None


def plain_name(name: str, option: str, folder_option: str) -> str:
    """`name` if it is a name and not a path, so a folder made from it stays inside the folder it is made in."""
    if problem := _name_problem(name):
        raise UserError(f"{option} {name[:60]!r}{'...' if len(name) > 60 else ''} {problem}; give a name of "
                        f"letters, digits, -, _ or dots (or leave {option} out for the default).")
    if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise UserError(f"{option} {name!r} is not a plain name (no slashes, not starting with a dot); choose the "
                        f"folder with {folder_option} and name it with letters, digits, -, _ or dots.")
    return name


def check_folder_name(path: Path) -> None:
    """Refuse a folder lmlab is to make whose own name it cannot use."""
    name = Path(path).name
    if (problem := _name_problem(name)) and str(path) not in ("", "."):
        raise UserError(f"the folder name {name[:60]!r}{'...' if len(name) > 60 else ''} (of {str(path)[:80]!r}) "
                        f"{problem}; choose another.")


def human_bytes(count: float) -> str:
    """`512 bytes`, `3.1 MiB`, `2.0 TiB`."""
    if count < 1024:
        return f"{count:,.0f} bytes"
    power = min(5, (int(count).bit_length() - 1) // 10)  # the largest power of 1024 it reaches, up to PiB
    return f"{count / 1024**power:,.1f} {'KMGTP'[power - 1]}iB"


def free_space(path: Path) -> str:
    """`3.1 MiB free`: the disk holding `path` or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return f"{human_bytes(shutil.disk_usage(path).free)} free"


def host_memory() -> int:
    """Bytes a new allocation can have on this machine, within a container's limit (cgroup v2)."""
    available = psutil.virtual_memory().available
    try:
        limit, used = (Path("/sys/fs/cgroup", name).read_text().strip() for name in ("memory.max", "memory.current"))
        return min(available, int(limit) - int(used)) if limit != "max" else available
    except (OSError, ValueError):
        return available


SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a full disk, a quota, a file size limit


def _blocking_file(path: Path | str) -> str | None:
    """What stands where a folder of `path` (or `path` itself) should be, and the fix: a file, or a link that leads
    to nothing (a missing target, or a loop of links); None if nothing does."""
    for part in [*reversed(Path(path).parents), Path(path)][1:]:
        if part.is_symlink() and not part.exists():  # exists() follows the link
            return _dangling(part)
        if not part.exists():
            return None
        if not part.is_dir():
            return f"{part} is a file, not a folder: choose another path"
    return None


def _dangling(link: Path) -> str:
    """The clause for a link that leads to nothing: where it points, and what to do."""
    try:
        os.stat(link)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return (f"{link} is a link to {os.readlink(link)} that leads back to itself: remove the link or choose "
                    "another path")
    target = os.path.realpath(link)  # the end of a chain of links, absolute: where the folder would have to be
    return (f"{link} is a link to {target}, which does not exist: create {target}, remove the link or choose another "
            "path")


def os_fix(err: OSError, path: Path | str, writing: bool = True) -> str:
    """What to do about an OSError met writing (or using) `path`, by its cause; one clause."""
    code = err.errno
    if code in SPACE_ERRORS:
        return "free some space or choose another folder"
    if code in (errno.EACCES, errno.EPERM):
        return "make it writable for you or choose another folder" if writing else "check its permissions"
    if code == errno.EROFS:
        return "it is on a read-only file system: choose a folder on a writable disk"
    blocking = _blocking_file(path) if code in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.ELOOP) else None
    if blocking:
        return blocking
    if code in (errno.ENOTDIR, errno.EEXIST):
        return "a part of the path is a file: choose another path"
    if code == errno.ENAMETOOLONG:
        return "a name in it is too long: choose a shorter one"
    return "it is a folder: name a file instead" if code == errno.EISDIR else "choose another folder"


def _is_stream(path: Path) -> bool:
    try:
        return stat.S_IFMT(os.stat(path).st_mode) in STREAMS
    except OSError:
        return False


class WriteError(UserError):
    """A write that failed: `path`, `reason` (the system's words), `free` (for a full disk) and `fix`."""

    def __init__(self, path: Path, reason: str, code: int | None = None):
        self.path, self.reason = Path(path), reason
        stream = _is_stream(self.path)
        self.free = f"{free_space(path)} on its disk" if (code in SPACE_ERRORS or code is None) and not stream else None
        self.fix = "name a regular file instead" if stream else os_fix(OSError(code, reason), self.path)
        detail = f"{self.reason}; {self.free}" if self.free else self.reason
        super().__init__(f"could not write {self.path} ({detail}); {self.fix}, then run the command again.")

    def not_kept(self) -> str:
        return f"{self.path} ({self.reason}); {self.fix} to keep the next."


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Report an OSError raised while writing `path` as a WriteError."""
    try:
        yield
    except OSError as err:
        raise WriteError(path, err.strerror or str(err), err.errno) from err


# What an output may name besides a regular file: a stream is written through (`--out /dev/stdout`, a pipe, /dev/null);
# anything else is refused, never replaced by a regular file (a disk written over, a device node gone).
STREAMS = {stat.S_IFCHR: "a character device", stat.S_IFIFO: "a named pipe"}
NOT_OUTPUTS = {stat.S_IFBLK: "a block device (a disk)", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def output_target(path: Path, option: str = "") -> tuple[Path, bool]:
    """The file an output named `path` (given as `option`) writes, and whether it is a stream written through rather
    than a regular file replaced whole. A symbolic link is followed, so it goes on naming the new file; a path that
    names a block device, a socket or a folder is refused in one sentence, and so is a loop of links (in the path or
    at its end), which has no file to follow to."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path
    try:
        mode = os.stat(target).st_mode
    except OSError as err:  # nothing there yet, or a path the write itself will fail on and name (too long, ...)
        if err.errno == errno.ELOOP:  # realpath stops inside a loop: renaming over that link would destroy it
            raise UserError(f"{option} {_blocking_file(path)}.".lstrip())
        return target, False
    kind = stat.S_IFMT(mode)
    if kind in NOT_OUTPUTS:
        via = f" (through the link {path})" if target != path else ""
        named = f"{option} {target}" if option else str(target)
        raise UserError(f"{named}{via} is {NOT_OUTPUTS[kind]}, not a file; name a file to write instead.")
    return target, kind in STREAMS


READ_MOST = 256 << 20  # bytes: the most of a file read whole; the largest lmlab writes (a tokenizer.json) is tens of MB


class ReadError(UserError):
    """A file that cannot be read: `path`, `reason` (what stands there, or the system's words) and `fix`."""

    def __init__(self, path: Path | str, reason: str, fix: str):
        self.path, self.reason, self.fix = Path(path), reason, fix
        super().__init__(f"{self.path} cannot be read ({reason}); {fix}, then run the command again.")

    @classmethod
    def of(cls, path: Path | str, err: OSError | None = None) -> ReadError:
        """What keeps `path` from being read: something other than a file there, else `err`."""
        with contextlib.suppress(OSError):
            kind = {**STREAMS, **NOT_OUTPUTS}.get(stat.S_IFMT(os.stat(path).st_mode))
            if kind:
                via = f"a link to {os.path.realpath(path)}, " if os.path.islink(path) else ""
                return cls(path, f"it is {via}{kind}, not a file", "put the file that belongs there in its place")
        assert err is not None, f"{path} is a file: only an error keeps it from being read"
        return cls(path, err.strerror or str(err), os_fix(err, path, writing=False))


def open_file(path: Path | str) -> BinaryIO:
    """`path` opened to read, never waiting: the one open of every file lmlab reads that it did not just write. A
    named pipe (whose open waits for a writer), a device (whose reads may never end), a socket or a folder is refused,
    as is a file that cannot be opened (ReadError, naming it and the fix); a missing one is a FileNotFoundError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:  # a socket's open fails (ENXIO), as does one of a file without permission
        raise ReadError.of(path, err) from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ReadError.of(path)
    return os.fdopen(fd, "rb")


def a_file(path: Path) -> str:
    """`path` as a string for a library that opens it itself (safetensors, a tokenizer's vocab), once `open_file` found
    a file there: what would hold or feed that library's own open is refused first."""
    open_file(path).close()
    return str(path)


def read_bytes(path: Path | str, most: int = READ_MOST) -> bytes:
    """The bytes of the file at `path` (`open_file`), refused (ReadError) past `most` of them: what a reader holds
    whole is bounded, whatever was put in the file's place."""
    with open_file(path) as f:
        data = f.read(most + 1)
    if len(data) > most:
        raise ReadError(path, f"it holds more than {human_bytes(most)}, more than a file of its kind does",
                        "check that it is the file meant")
    return data


def read_text(path: Path | str, most: int = READ_MOST) -> str:
    """`read_bytes` as UTF-8 text; bytes that are not UTF-8 are a UnicodeDecodeError (a ValueError, as bad JSON is)."""
    return read_bytes(path, most).decode("utf-8")


def check_writable(path: Path) -> None:
    """Make sure a file can be written at `path` (its folders made), before the work that produces it."""
    target, stream = output_target(path)
    with writing(path):
        if stream:
            if not os.access(target, os.W_OK):
                raise PermissionError(errno.EACCES, "Permission denied")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:100]}.probe-")
        os.close(fd)
        os.unlink(probe)


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """The path to write an output named `path` through, the one writer of every file lmlab makes: a regular file is
    written under a temporary name beside it, made durable and renamed over it when the block ends, so a reader never
    sees half of it and a failure leaves what was there; a stream (`output_target`) is written through. A failed
    write is a WriteError."""
    target, stream = output_target(path)
    with writing(path):
        if stream:
            yield target
            return
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            yield tmp
            fsync(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # a write that failed half-way leaves nothing behind
        fsync(target.parent)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_whole(path: Path, text: str) -> None:
    """Append `text` in one locked write, so appends by several processes never interleave and each is whole."""
    with writing(path), open(path, "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        data = text.encode("utf-8")
        size = f.seek(0, os.SEEK_END)
        try:
            if os.write(f.fileno(), data) != len(data):
                raise OSError(28, "No space left on device")
        except OSError:
            f.truncate(size)  # no half an entry: the next reader would take it for part of the next one
            raise


@contextmanager
def locked_file(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if need be) around a read-modify-write several processes do."""
    with writing(path):  # O_RDWR: a named pipe's open does not wait for a writer, and is refused
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ReadError.of(path)
    with os.fdopen(fd, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield
