"""Audio written as it is produced: chunk by chunk through `files.replace_file` (a temporary file beside
the target, renamed over it only once every chunk is in). Memory stays flat whatever the length, and a failure (or Ctrl-C) leaves an
existing file of that name untouched."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf

from glmvoice_cli.audio.io import WRITE_FORMATS, _reason
from glmvoice_cli.errors import AudioError
from glmvoice_cli.files import replace_file


def write_audio_chunks(path: str | Path, chunks: Iterable[np.ndarray], sample_rate: int) -> int:
    """Write float chunks ((n,) each, clipped to [-1, 1]) to a .wav/.flac/.ogg file by extension; returns
    the samples written. Writing errors are AudioError naming the file; the chunks' own errors pass through."""
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(WRITE_FORMATS)
        raise AudioError(f"cannot write {path}: unknown audio extension {path.suffix!r} (use {known})")
    written, producing = 0, False
    try:
        with replace_file(path) as fh:  # whole or not at all: temporary file, fsync, rename
            with _writing(path):  # on the descriptor: libsndfile's own I/O reports a full disk as one error,
                # where a Python file object would print a traceback from each failing cffi callback first
                out = sf.SoundFile(fh.fileno(), "w", sample_rate, 1, fmt[1], format=fmt[0], closefd=False)
            try:
                iterator = iter(chunks)
                while True:
                    producing = True  # an error of the producer is its own, not a writing error
                    chunk = next(iterator, None)
                    producing = False
                    if chunk is None:
                        break
                    data = np.clip(np.asarray(chunk, dtype=np.float32).reshape(-1), -1.0, 1.0)
                    with _writing(path):
                        out.write(data)
                    written += len(data)
            finally:
                with _writing(path):
                    out.close()
    except OSError as e:  # replace_file's own create, fsync or rename
        if producing:
            raise
        raise AudioError(f"cannot write audio file {path}: {e.strerror or e}") from e
    return written


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """OSError and libsndfile's RuntimeError become one AudioError naming `path`."""
    try:
        yield
    except OSError as e:
        raise AudioError(f"cannot write audio file {path}: {e.strerror or e}") from e
    except RuntimeError as e:
        reason = _reason(e)
        if reason == "system error" and _disk_full(path):  # libsndfile's words for a failed write(2)
            reason = os.strerror(errno.ENOSPC)
        raise AudioError(f"cannot write audio file {path}: {reason}") from e


def _disk_full(path: Path) -> bool:
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
