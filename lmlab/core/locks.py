"""The one-writer lock of a run or dataset folder: held by one process, released however it exits, never inherited
by a forked child."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import weakref
from pathlib import Path

from lmlab.core.errors import UserError
from lmlab.core.fileio import WriteError, check_folder_name, read_bytes, writing


class WriterLock:
    """The one-writer lock of a folder: an exclusive `flock` on `.NAME.lock`, which the kernel releases however its
    holder exits; the file names the holder. Beside the folder, so one built elsewhere and renamed in is covered."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.lock"
        self._fd: int | None = None
        self._made: list[Path] = []

    @property
    def held_here(self) -> bool:
        return self._fd is not None

    def acquire(self, refusal: str) -> None:
        """Take the lock, or raise UserError(`refusal`, with `{holder}` filled in) when another writer has it."""
        if self._fd is not None:
            return
        check_folder_name(self.target)
        # made for the lock file alone: removed on release if still empty
        self._made = [p for p in [self.path.parent, *self.path.parent.parents] if not p.exists()]
        with writing(self.target.parent):  # the first write of every writer: a folder it cannot write ends here
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._open_locked(refusal)
        _HELD.add(self)
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
        try:
            with writing(self.path):  # its holder's line: on a full disk the lock file is what cannot be written
                os.ftruncate(self._fd, 0)
                os.write(self._fd, f"pid {os.getpid()}: {command}".encode())
        except WriteError:
            self.release()
            raise

    def _open_locked(self, refusal: str) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(refusal.format(holder=self.holder() or "another process"))
            if self._same_file(fd):  # else the last holder removed the file between our open and our lock
                return fd
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        if self._same_file(self._fd):
            self.path.unlink()  # while still locked: the next writer's inode check sees a new file
        os.close(self._fd)
        self._fd = None
        _HELD.discard(self)
        for folder in self._made:
            with contextlib.suppress(OSError):  # not empty, or already gone
                folder.rmdir()

    def __del__(self) -> None:  # e.g. a Trainer built but never run
        if self._fd is None:  # nothing held (a run only read): at exit the module's globals may be gone already
            return
        with contextlib.suppress(OSError):  # the file already removed by hand: the lock goes with the descriptor
            self.release()

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def held(self) -> bool:
        """Whether some process, this one included, holds the lock now."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # a named pipe put there would block the open
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also releases the shared lock, if it was taken

    def holder(self) -> str | None:
        """`pid N: COMMAND` of the holder, as it wrote it, or None."""
        try:
            return read_bytes(self.path, 4096).decode("utf-8", "replace").strip() or None
        except (OSError, UserError):
            return None


_HELD: weakref.WeakSet[WriterLock] = weakref.WeakSet()  # the locks this process holds


def release_held() -> None:
    """Give up every lock this process holds, their files removed: a process about to end at once leaves none."""
    for lock in list(_HELD):
        lock.release()


def _drop_in_child() -> None:
    """A forked child closes its copies of the lock descriptors, else it would hold the lock past a killed parent."""
    for lock in list(_HELD):
        if lock._fd is not None:
            os.close(lock._fd)
        lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)
