"""Audio written as it is produced: chunk by chunk into a temporary file beside the target, renamed over
it only once every chunk is in. Memory stays flat whatever the length, and a failure (or Ctrl-C) leaves an
existing file of that name untouched."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf

from glmvoice_cli.audio.io import WRITE_FORMATS, _reason
from glmvoice_cli.errors import AudioError


def write_audio_chunks(path: str | Path, chunks: Iterable[np.ndarray], sample_rate: int) -> int:
    """Write float chunks ((n,) each, clipped to [-1, 1]) to a .wav/.flac/.ogg file by extension; returns
    the samples written. Writing errors are AudioError naming the file; the chunks' own errors pass through."""
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(WRITE_FORMATS)
        raise AudioError(f"cannot write {path}: unknown audio extension {path.suffix!r} (use {known})")
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    written = 0
    try:
        with _writing(path):
            fh = temp.open("xb")  # exclusive create; the umask decides the mode, as for any new file
        with fh:
            with _writing(path):  # on the descriptor: libsndfile's own I/O reports a full disk as one error,
                # where a Python file object would print a traceback from each failing cffi callback first
                out = sf.SoundFile(fh.fileno(), "w", sample_rate, 1, fmt[1], format=fmt[0], closefd=False)
            try:
                for chunk in chunks:  # outside _writing: an error of the producer is its own
                    data = np.clip(np.asarray(chunk, dtype=np.float32).reshape(-1), -1.0, 1.0)
                    with _writing(path):
                        out.write(data)
                    written += len(data)
            finally:
                with _writing(path):
                    out.close()
            with _writing(path):
                os.fsync(fh.fileno())  # the data is on disk before the name points at it
        with _writing(path):
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
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
