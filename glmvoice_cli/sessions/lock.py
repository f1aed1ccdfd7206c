"""One chat per session folder: an OS file lock on `.lock` in the folder, held while the chat runs.

Two chats appending to one transcript would interleave their turns (u u a a u a), and a later `--resume`
would restore that mixed history. The lock is `filelock`'s (flock on POSIX, LockFileEx on Windows) on a file
that stays in the folder (removing it would let a third process lock a fresh file while the second still
holds the old one). The OS drops the lock when the process ends, however it ends (a crash, `kill -9`), so a
lock never outlives its chat. The holder writes its process id into the file for the message a second chat
shows. Where the file system refuses locks (some network mounts) the folder is used unlocked, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import filelock

from glmvoice_cli.errors import GlmVoiceError

LOCK_FILE = ".lock"
PID_BYTES_MAX = 32  # the holder's process id, as text, read for the message

log = logging.getLogger("glmvoice_cli")


class SessionBusyError(GlmVoiceError):
    """Another chat holds the session folder."""

    exit_code = 1


class SessionLock:
    """An exclusive lock on a session folder, held until release() (or the process ends)."""

    def __init__(self, folder: Path, lock: filelock.BaseFileLock | None) -> None:
        self.folder = folder
        self._lock = lock

    @classmethod
    def acquire(cls, folder: str | Path) -> SessionLock:
        """Lock `folder` (it must exist) or raise SessionBusyError naming the process that holds it."""
        folder = Path(folder)
        path = folder / LOCK_FILE
        _check_lock_file(path)
        # no soft fallback: a marker file left by a crash would lock the session for good
        lock = filelock.FileLock(path, timeout=0, mode=0o644, preserve_lock_file=True, on_acquired=_note_pid,
                                 fallback_to_soft=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise SessionBusyError(
                f"session {folder} is in use by another glmvoice chat{_holder(path)}; wait for it to end "
                "or start a new session") from None
        except OSError as e:
            _check_lock_file(path)  # replaced by a link or a FIFO between the check and the open
            log.info("cannot lock %s (%s); the session is not protected from a second chat", folder, e)
            return cls(folder, None)
        return cls(folder, lock)

    @property
    def held(self) -> bool:
        return self._lock is not None

    def release(self) -> None:
        """Unlock; calling it again does nothing."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[SessionLock]:
    """Hold the lock on `folder` for the block (see SessionLock.acquire)."""
    lock = SessionLock.acquire(folder)
    try:
        yield lock
    finally:
        lock.release()


def _check_lock_file(path: Path) -> None:
    """A session folder is untrusted input: a `.lock` that links elsewhere would have the pid written over its
    target (or a dangling link create one), and a FIFO or a device holds neither a lock nor a pid."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise GlmVoiceError(f"cannot lock session folder {path.parent}: {e.strerror or e}") from e
    if stat.S_ISLNK(mode):
        raise GlmVoiceError(f"cannot lock session folder {path.parent}: {path.name} is a symbolic link "
                            "(a session's files must be its own; remove it)")
    if not stat.S_ISREG(mode):
        raise GlmVoiceError(f"cannot lock session folder {path.parent}: {path.name} is not a regular file "
                            "(remove it)")


def _note_pid(fd: int) -> None:
    """Write our process id for the message a second chat shows; a full disk just leaves it out."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(path: Path) -> str:
    """' (process 1234)' from the lock file, or '' when it names none (or cannot be read: Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return ""
    try:
        text = os.read(fd, PID_BYTES_MAX).decode("ascii", "replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)
    return f" (process {text})" if text.isdigit() else ""
