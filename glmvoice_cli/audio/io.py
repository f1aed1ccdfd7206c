"""Audio files in and out: read anything libsndfile reads, mix down to mono, resample with soxr.

The reference keeps channel 0 and resamples with torchaudio's sinc filter. We average all channels
(a stereo recording with the voice on the right channel still works) and resample with soxr's
high-quality, anti-aliased filter. On 16 kHz mono input, the format of the golden fixtures, both
paths return the file's samples unchanged.
"""

from __future__ import annotations

import io
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from glmvoice_cli.config import SAMPLE_RATE_IN as TOKENIZER_SAMPLE_RATE  # Hz, what the tokenizer expects
from glmvoice_cli.errors import AudioError
from glmvoice_cli.files import waiting_note, write_file

READ_BLOCK_FRAMES = 1 << 16  # frames per read: a truncated file keeps every block read before the damage
SALVAGE_BLOCK_FRAMES = 256  # frames per read when re-reading the block that failed
RESAMPLE_QUALITY = "HQ"  # soxr: 20-bit precision, flat to ~94% of Nyquist, stopband far below 16-bit noise
MAX_AUDIO_S = 2 * 3600.0  # read whole into memory (float32, mono): 2 h at 48 kHz is 1.4 GB before resampling
ENV_MAX_AUDIO = "GLMVOICE_MAX_AUDIO_S"
PIPE_MAX_BYTES = 1 << 30  # a pipe is read into memory once (it cannot seek); 1 GiB is 9 h of 16 kHz 16-bit mono
STREAMED_SIZE_MIN = 0x7FFF_F000  # bytes; WAV writers on pipes put a placeholder this large in the header
WRITE_FORMATS = {  # extension -> (libsndfile format, subtype)
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
}
_WAV_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


@dataclass(frozen=True)
class Audio:
    """A mono signal read from a file."""

    samples: np.ndarray  # (n,) float32 mono; PCM formats in [-1, 1], float files as stored
    sample_rate: int  # Hz
    source: str  # the path it was read from
    warnings: tuple[str, ...] = ()  # one line each, e.g. a truncated file read in part

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def read_audio(path: str | Path) -> Audio:
    """Read any file libsndfile reads, at its own rate, mixed down to mono float32.

    Raises AudioError (naming the file) for a missing, empty, non-audio or sample-less file and for
    NaN/inf samples. A truncated file gives its readable part and a line in ``warnings``.
    """
    path = Path(path)
    source = _open_source(path)
    try:
        handle = sf.SoundFile(source())
    except RuntimeError as e:
        raise AudioError(f"{path} is not a readable audio file ({_reason(e)})") from e
    with handle:
        limit_s = max_audio_seconds()
        if handle.frames > limit_s * handle.samplerate and handle.frames < STREAMED_SIZE_MIN:
            raise AudioError(_too_long(path, handle.frames / handle.samplerate, limit_s))
        blocks, error = _read_blocks(handle, path, READ_BLOCK_FRAMES, max_frames=int(limit_s * handle.samplerate))
        expected, sample_rate, log = handle.frames, handle.samplerate, handle.extra_info
    if error is not None:
        blocks += _salvage(source, path, sum(map(len, blocks)))
    samples = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    if len(samples) == 0:
        if error is not None or expected > 0 or _wav_data_sizes(log) is not None:
            why = f" ({error})" if error else ""
            raise AudioError(f"{path} is truncated or corrupt, no samples could be read{why}")
        raise AudioError(f"audio file has no samples (zero length): {path}")
    seconds = len(samples) / sample_rate
    warnings: list[str] = []
    if error is not None or len(samples) < expected:
        detail = f"{len(samples)} of {expected} frames readable" + (f", {error}" if error else "")
        warnings.append(f"{path} is truncated or corrupt ({detail}); using the {seconds:.2f} s read")
    elif (sizes := _wav_data_sizes(log)) is not None:
        claimed, present = sizes
        warnings.append(
            f"{path} is truncated (header announces {claimed} bytes of audio data, {present} present); "
            f"using the {seconds:.2f} s read"
        )
    peak = float(np.abs(samples).max())
    if peak > 1.0:
        warnings.append(f"{path}: samples exceed [-1, 1] (peak {peak:.3g}); kept as stored")
    return Audio(samples, sample_rate, str(path), tuple(warnings))


def resample(samples: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """(n,) float32 at sr_in Hz -> (round(n * sr_out / sr_in),) float32 at sr_out Hz.

    Equal rates return the input values untouched (no filtering).
    """
    samples = np.asarray(samples, dtype=np.float32)
    if sr_in == sr_out:
        return samples
    return soxr.resample(samples, sr_in, sr_out, quality=RESAMPLE_QUALITY).astype(np.float32, copy=False)


def load_audio(path: str | Path, sample_rate: int = TOKENIZER_SAMPLE_RATE) -> Audio:
    """Read a file as mono float32 at ``sample_rate`` Hz (see read_audio for the errors)."""
    audio = read_audio(path)
    samples = resample(audio.samples, audio.sample_rate, sample_rate)
    if len(samples) == 0:
        raise AudioError(f"audio file is too short to resample to {sample_rate} Hz: {audio.source}")
    return Audio(samples, sample_rate, audio.source, audio.warnings)


def write_audio(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write (n,) float samples as 16-bit WAV/FLAC or Vorbis OGG by extension; ``-`` is WAV on stdout.

    Samples are clipped to [-1, 1] so integer formats never wrap around. The file is encoded in memory, then
    replaces `path` whole or not at all (glmvoice_cli.files): a failure (a full disk) leaves an existing file
    untouched and raises one AudioError line, never a libsndfile callback traceback.
    """
    if str(path) == "-":
        sys.stdout.buffer.write(encode_audio(samples, sample_rate, WRITE_FORMATS[".wav"]))
        sys.stdout.buffer.flush()
        return
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(WRITE_FORMATS)
        raise AudioError(f"cannot write {path}: unknown audio extension {path.suffix!r} (use {known})")
    try:
        data = encode_audio(samples, sample_rate, fmt)
    except RuntimeError as e:
        raise AudioError(f"cannot write audio file {path}: {_reason(e)}") from e
    try:
        write_file(path, data)
    except OSError as e:
        raise AudioError(f"cannot write audio file {path}: {e.strerror or e}") from e


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: tuple[str, str]) -> bytes:
    """(n,) float samples as the bytes of a (libsndfile format, subtype) file, clipped to [-1, 1]."""
    data = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    buffer = io.BytesIO()
    sf.write(buffer, data, sample_rate, format=fmt[0], subtype=fmt[1])
    return buffer.getvalue()


def _open_source(path: Path) -> Callable[[], Path | io.BytesIO]:
    """What libsndfile reads, as a factory (a salvage re-reads from the start): the path of a regular file,
    or the bytes of a named pipe or `<(...)` read once, up to PIPE_MAX_BYTES. Errors libsndfile would
    report vaguely ("System error", or "possibly a pipe?") are checked here, naming the file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {path}") from None
    except OSError as e:
        raise AudioError(f"cannot open audio file {path}: {e.strerror or e}") from e
    if stat.S_ISDIR(mode):
        raise AudioError(f"{path} is a directory, not an audio file")
    try:
        with waiting_note(path), path.open("rb") as fh:
            data = fh.read(1 if stat.S_ISREG(mode) else PIPE_MAX_BYTES + 1)
    except OSError as e:
        raise AudioError(f"cannot open audio file {path}: {e.strerror or e}") from e
    if not data:
        raise AudioError(f"audio file is empty (0 bytes): {path}")
    if stat.S_ISREG(mode):
        return lambda: path
    if len(data) > PIPE_MAX_BYTES:
        raise AudioError(f"{path} streams more than {PIPE_MAX_BYTES >> 30} GiB: save it to a file and give that")
    return lambda: io.BytesIO(data)


def max_audio_seconds() -> float:
    """The longest audio read into memory: MAX_AUDIO_S, or GLMVOICE_MAX_AUDIO_S (seconds) to raise it."""
    value = os.environ.get(ENV_MAX_AUDIO, "").strip()
    try:
        seconds = float(value) if value else MAX_AUDIO_S
    except ValueError:
        raise AudioError(f"{ENV_MAX_AUDIO}={value!r} is not a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise AudioError(f"{ENV_MAX_AUDIO}={value!r} must be a positive, finite number of seconds")
    return seconds


def _too_long(path: Path, seconds: float, limit_s: float) -> str:
    return (f"{path} is over {limit_s / 3600:.3g} h of audio ({seconds / 3600:.3g} h or more): cut it into parts, "
            f"or raise the limit with {ENV_MAX_AUDIO}=SECONDS if the memory allows (about 4 bytes per sample)")


def _read_blocks(handle: sf.SoundFile, path: Path, frames: int,
                 max_frames: int | None = None) -> tuple[list[np.ndarray], str | None]:
    """Read to the end or to the first decoder error: ([(frames,) float32 mono, ...], error or None).

    libsndfile raises mid-file on a truncated FLAC (losing that whole read) and returns short on a
    truncated MP3, so we read in blocks and keep those before the damage. Channels are averaged
    block by block.
    """
    blocks: list[np.ndarray] = []
    error = None
    total = 0
    while True:
        try:
            block = handle.read(frames, dtype="float32", always_2d=True)  # (frames, channels)
        except RuntimeError as e:
            error = _reason(e)
            break
        if len(block) == 0:
            break
        mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
        if not np.isfinite(mono).all():
            raise AudioError(f"audio file contains NaN or infinite samples: {path}")
        blocks.append(mono)
        total += len(mono)
        if max_frames is not None and total > max_frames:  # a header that lies, or a stream: counted as read
            raise AudioError(_too_long(path, total / handle.samplerate, max_frames / handle.samplerate))
    return blocks, error


def _salvage(source: Callable[[], Path | io.BytesIO], path: Path, start: int) -> list[np.ndarray]:
    """Re-read from frame ``start`` in small blocks up to the damage; [] where seeking fails too."""
    try:
        with sf.SoundFile(source()) as handle:
            handle.seek(start)
            return _read_blocks(handle, path, SALVAGE_BLOCK_FRAMES)[0]
    except RuntimeError:
        return []


def _wav_data_sizes(log: str) -> tuple[int, int] | None:
    """(claimed, present) data bytes when a WAV header announces more than the file holds.

    libsndfile silently shortens such a file, noting the mismatch only in its log.
    """
    match = _WAV_DATA_SIZE.search(log)
    if match is None:
        return None
    claimed, present = int(match.group(1)), int(match.group(2))
    if claimed <= present or claimed >= STREAMED_SIZE_MIN:
        return None
    return claimed, present


def _reason(error: RuntimeError) -> str:
    """libsndfile's message without the "Error opening 'file': " prefix, in our words where vague."""
    text = getattr(error, "error_string", None) or str(error)
    text = text.removeprefix("Error : ").strip().rstrip(".")
    if text in ("Format not recognised", "File does not exist or is not a regular file (possibly a pipe?)"):
        return "not a recognised audio format"
    return text[:1].lower() + text[1:]
