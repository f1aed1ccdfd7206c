"""Files replaced whole or not at all: written to a temporary file beside the target, then renamed over it.

Every file glmvoice writes where a user (or a session) will look for it goes through `replace_file`: a
failure half-way (a full disk, a signal, a bug) leaves an existing file exactly as it was and no temporary
file behind, and a reader never sees a half-written file. The temporary file sits in the target's own folder
so that the rename is atomic (same file system).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".partial"  # ".out.wav.1a2b3c4d.partial": hidden, and plainly not the finished file
TEMP_RANDOM_BYTES = 4  # two writers of the same target never share a temporary file
NEW_FILE_MODE = 0o666  # before the umask, as open() would create it


@contextlib.contextmanager
def replace_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file for the new content of `path`, put in place only when the block ends without error.

    On success the data is fsynced and renamed over `path` (keeping an existing file's permissions, and
    writing through a symbolic link to its target). On any exception, KeyboardInterrupt included, the
    temporary file is removed and `path` is untouched; OSError propagates for the caller to word.
    """
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(TEMP_RANDOM_BYTES)}{TEMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _keep_mode(target, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def write_file(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` whole or not at all (see replace_file); OSError on failure."""
    with replace_file(path) as fh:
        fh.write(data)


def fsync_dir(path: Path) -> None:
    """Make new directory entries durable where the platform allows it (not on Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):  # some file systems refuse to fsync a folder; the data is synced
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _keep_mode(target: Path, tmp: Path) -> None:
    """Give the new file the permissions of the one it replaces (a private file stays private)."""
    with contextlib.suppress(OSError):
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
