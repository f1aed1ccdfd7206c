"""Files replaced whole or not at all: written to a temporary file beside the target, then renamed over it.

Every file glmvoice writes where a user (or a session) will look for it goes through `replace_file`: a
failure half-way (a full disk, a signal, a bug) leaves an existing file exactly as it was and no temporary
file behind, and a reader never sees a half-written file. The temporary file sits in the target's own folder
so that the rename is atomic (same file system).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from glmvoice_cli.threads import after

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


def read_limited(path: str | Path, limit: int) -> bytes:
    """The bytes of `path`, read with a cap: a file (or /dev/zero, a FIFO that never ends) past `limit` bytes is
    an OSError (EFBIG) whose message says the limit, so every caller's `except OSError` words it in one line."""
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"over {_size(limit)}, far larger than such a file is")
    return data


def loads_json(data: bytes | str) -> Any:
    """json.loads, where nesting too deep for the parser is a ValueError like any other malformed JSON."""
    try:
        return json.loads(data)
    except RecursionError as e:
        raise ValueError("JSON nested too deeply") from e


def _size(n: int) -> str:
    if n >= 1 << 20:
        return f"{n >> 20} MiB"
    return f"{n >> 10} KiB" if n >= 1 << 10 else f"{n} bytes"


FIFO_NOTE_AFTER_S = 0.5  # a pipe with a writer (`<(...)`) opens at once; past this, nobody is writing yet


@contextlib.contextmanager
def waiting_note(path: str | Path) -> Iterator[None]:
    """Around a read of `path`: a named pipe with no writer blocks without a word, so if the read has not
    finished after a moment, say on stderr what is being waited for. Regular files say nothing."""
    import sys

    try:
        fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        fifo = False
    if not fifo:
        yield
        return

    def say() -> None:
        print(f"waiting for something to write into the named pipe {path} (Ctrl-C to stop)", file=sys.stderr,
              flush=True)

    with after(FIFO_NOTE_AFTER_S, say):
        yield
