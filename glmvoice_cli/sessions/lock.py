"""One chat per session folder: an OS file lock on `.lock` in the folder, held while the chat runs.

Two chats appending to one transcript would interleave their turns (u u a a u a), and a later `--resume`
would restore that mixed history. The lock is `flock` on a file that stays in the folder (removing it
would let a third process lock a fresh file while the second still holds the old one). The kernel drops the
lock when the process ends, however it ends (a crash, `kill -9`), so a lock never outlives its chat. Where
the platform has no `flock` (Windows) or the file system refuses it (some network mounts) the folder is
used unlocked, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from glmvoice_cli.errors import GlmVoiceError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
PID_BYTES_MAX = 32  # the holder's process id, as text, read for the message

log = logging.getLogger("glmvoice_cli")


class SessionBusyError(GlmVoiceError):
    """Another chat holds the session folder."""

    exit_code = 1


class SessionLock:
    """An exclusive lock on a session folder, held until release() (or the process ends)."""

    def __init__(self, folder: Path, handle: IO[bytes] | None) -> None:
        self.folder = folder
        self._handle = handle

    @classmethod
    def acquire(cls, folder: str | Path) -> SessionLock:
        """Lock `folder` (it must exist) or raise SessionBusyError naming the process that holds it."""
        folder = Path(folder)
        if fcntl is None:
            return cls(folder, None)
        handle = _open_lock_file(folder / LOCK_FILE)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise SessionBusyError(
                f"session {folder} is in use by another glmvoice chat{holder}; wait for it to end "
                "or start a new session") from None
        except OSError as e:  # no locks on this file system: go on unlocked, as on Windows
            log.info("cannot lock %s (%s); the session is not protected from a second chat", folder, e)
            handle.close()
            return cls(folder, None)
        _note_pid(handle)
        return cls(folder, handle)

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Unlock (closing the file drops the lock); calling it again does nothing."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()


@contextlib.contextmanager
def locked(folder: str | Path) -> Iterator[SessionLock]:
    """Hold the lock on `folder` for the block (see SessionLock.acquire)."""
    lock = SessionLock.acquire(folder)
    try:
        yield lock
    finally:
        lock.release()


def _open_lock_file(path: Path) -> IO[bytes]:
    """The lock file, opened without following a link: a session folder is untrusted input, and a `.lock` that
    links elsewhere would have the pid written over its target (or a dangling link create one)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise GlmVoiceError(f"cannot lock session folder {path.parent}: {path.name} is a symbolic link "
                                "(a session's files must be its own; remove it)") from e
        raise GlmVoiceError(f"cannot lock session folder {path.parent}: {e.strerror or e}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device: neither holds a lock nor a pid
        os.close(fd)
        raise GlmVoiceError(f"cannot lock session folder {path.parent}: {path.name} is not a regular file "
                            "(remove it)")
    return os.fdopen(fd, "r+b", buffering=0)  # unbuffered: a full disk fails the pid write now, never at close


def _note_pid(handle: IO[bytes]) -> None:
    """Write our process id for the message a second chat shows; a full disk just leaves it out."""
    with contextlib.suppress(OSError):
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()


def _holder(handle: IO[bytes]) -> str:
    """' (process 1234)' from the lock file, or '' when it names none."""
    try:
        handle.seek(0)
        text = handle.read(PID_BYTES_MAX).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (process {text})" if text.isdigit() else ""
