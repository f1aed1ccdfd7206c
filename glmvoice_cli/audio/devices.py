"""Microphone and speaker over sounddevice (PortAudio), behind two small protocols.

`AudioSource` yields 16 kHz mono float32 blocks; `AudioSink` plays float32 blocks at 22.05 kHz
through a `PlaybackBuffer` (silence on underrun, `flush()` for barge-in, a played-sample counter).
The fakes in `glmvoice_cli.audio.fakes` implement the same protocols, so the conversation loop
never knows whether it talks to hardware.

sounddevice is imported inside the functions: without PortAudio, `import sounddevice` raises
OSError, and the rest of the CLI must still work. Every PortAudio problem becomes an
`AudioDeviceError` with one line and a hint.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, Protocol

import numpy as np

from glmvoice_cli.audio.playback import BufferedSink, PlaybackBuffer, PlayedTap
from glmvoice_cli.audio.stream_resample import soxr_stream
from glmvoice_cli.config import SAMPLE_RATE_IN, SAMPLE_RATE_OUT
from glmvoice_cli.errors import AudioDeviceError

Kind = Literal["input", "output"]
DeviceSpec = int | str | None  # index, (part of a) name, or None for the system default

CAPTURE_BLOCK_MS = 30  # microphone callback block: one VAD frame
PLAYBACK_BLOCK_MS = 20  # speaker callback block: small, so a flush is heard within ~20 ms
STALL_S = 2.0  # a running stream whose callback has not run for this long is a lost device
CLOSE_TIMEOUT_S = 2.0  # longest wait for PortAudio to stop and close a stream; a lost device may never return
CAPTURE_QUEUE_BLOCKS = 200  # 6 s of capture buffered before the oldest blocks are dropped
PORTAUDIO_HINT = ("install PortAudio: `apt install libportaudio2` (Debian, Ubuntu), `dnf install portaudio` "
                  "(Fedora), `brew install portaudio` (macOS); tts -o, transcribe and chat --input-file work "
                  "without it")
DEVICES_HINT = "see `glmvoice devices`"

log = logging.getLogger("glmvoice_cli")


class AudioSource(Protocol):
    """Mono float32 blocks at ``sample_rate`` (16 kHz for the microphone)."""

    sample_rate: int

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        """The next (n,) float32 block; an empty one when nothing came within ``timeout`` seconds;
        None once the source has ended (a file played to its end). Raises AudioDeviceError."""
        ...

    def close(self) -> None: ...


class AudioSink(Protocol):
    """Plays mono float32 blocks at ``sample_rate`` (22.05 kHz, the decoder's rate)."""

    sample_rate: int

    def write(self, block: np.ndarray) -> None:
        """Queue (n,) float32 samples; returns at once. Raises AudioDeviceError."""
        ...

    def flush(self) -> int:
        """Drop all queued audio at once (barge-in); returns the samples dropped."""
        ...

    @property
    def played(self) -> int:
        """Written samples (at ``sample_rate``) that have been played so far."""
        ...

    @property
    def pending(self) -> int:
        """Written samples not yet played."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DeviceInfo:
    """One PortAudio device, as `glmvoice devices` lists it."""

    index: int
    name: str
    host_api: str
    max_input_channels: int
    max_output_channels: int
    default_sample_rate: float  # Hz
    is_default_input: bool
    is_default_output: bool


def portaudio_problem() -> str | None:
    """None when sounddevice and its PortAudio library load, else the one-line reason with the fix."""
    try:
        import_sounddevice()
    except AudioDeviceError as e:
        return str(e)
    return None


def import_sounddevice() -> ModuleType:
    """sounddevice, or an AudioDeviceError saying what to install."""
    try:
        import sounddevice
    except OSError as e:  # the module is there, the PortAudio shared library is not
        raise AudioDeviceError(f"PortAudio library not found ({PORTAUDIO_HINT})") from e
    except ImportError as e:
        raise AudioDeviceError("the sounddevice package is not installed (pip install sounddevice)") from e
    return sounddevice


def list_devices() -> list[DeviceInfo]:
    """Every PortAudio device with its channels and default rate."""
    sd = import_sounddevice()
    try:
        devices = sd.query_devices()
        default_in, default_out = _defaults(sd)
        apis = [api["name"] for api in sd.query_hostapis()]
    except sd.PortAudioError as e:
        raise AudioDeviceError(f"cannot list audio devices: {e} ({PORTAUDIO_HINT})") from e
    return [
        DeviceInfo(
            index=int(d["index"]) if "index" in d else i,
            name=str(d["name"]),
            host_api=apis[d["hostapi"]] if 0 <= d["hostapi"] < len(apis) else "?",
            max_input_channels=int(d["max_input_channels"]),
            max_output_channels=int(d["max_output_channels"]),
            default_sample_rate=float(d["default_samplerate"]),
            is_default_input=i == default_in,
            is_default_output=i == default_out,
        )
        for i, d in enumerate(devices)
    ]


def resolve_device(spec: DeviceSpec, kind: Kind) -> DeviceInfo:
    """The device for an index, a unique (case-insensitive) part of a name, or the default."""
    devices = list_devices()
    usable = [d for d in devices if _channels(d, kind) > 0]
    what = "microphone (input device)" if kind == "input" else "speaker (output device)"
    if not usable:
        raise AudioDeviceError(f"no {what} found ({DEVICES_HINT}; check that one is plugged in)")
    if spec is None or spec == "":
        default = [d for d in usable if (d.is_default_input if kind == "input" else d.is_default_output)]
        return default[0] if default else usable[0]
    if isinstance(spec, int) or str(spec).strip().isdigit():
        index = int(spec)
        match = [d for d in usable if d.index == index]
        if not match:
            raise AudioDeviceError(f"no {what} with index {index} ({DEVICES_HINT})")
        return match[0]
    wanted = str(spec).strip().lower()
    exact = [d for d in usable if d.name.lower() == wanted]
    match = exact or [d for d in usable if wanted in d.name.lower()]
    if not match:
        raise AudioDeviceError(f"no {what} matches {spec!r} ({DEVICES_HINT})")
    if len(match) > 1:
        names = ", ".join(f"{d.index}: {d.name}" for d in match)
        raise AudioDeviceError(f"{spec!r} matches several devices ({names}); give the index instead")
    return match[0]


class Microphone:
    """Captures 16 kHz mono float32 blocks from an input device (resampled if it cannot do 16 kHz)."""

    def __init__(self, device: DeviceSpec = None, sample_rate: int = SAMPLE_RATE_IN,
                 block_ms: int = CAPTURE_BLOCK_MS) -> None:
        sd = import_sounddevice()
        self.info = resolve_device(device, "input")
        self.sample_rate = sample_rate
        self.device_rate = _pick_rate(sd, self.info, sample_rate, "input")
        self.overflows = 0  # blocks dropped because nobody read them, or reported by PortAudio
        self._queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=CAPTURE_QUEUE_BLOCKS)
        self._resampler = soxr_stream(self.device_rate, sample_rate)
        self._closed = False
        self._last_callback = time.monotonic()
        blocksize = self.device_rate * block_ms // 1000
        try:
            self._stream = sd.InputStream(samplerate=self.device_rate, blocksize=blocksize,
                                          device=self.info.index, channels=1, dtype="float32",
                                          callback=self._callback)
            self._stream.start()
        except (sd.PortAudioError, ValueError) as e:
            raise AudioDeviceError(f"cannot open microphone {self.info.name!r}: {e} ({DEVICES_HINT})") from e

    def _callback(self, indata: np.ndarray, frames: int, when: Any, status: Any) -> None:
        self._last_callback = time.monotonic()
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        block = indata[:, 0].copy()
        try:
            self._queue.put_nowait(block)
        except queue.Full:  # the reader is stuck: keep the newest audio
            self.overflows += 1
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
            self._queue.put_nowait(block)

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        try:
            block = self._queue.get(timeout=timeout)
        except queue.Empty:
            self._check_alive()
            return np.zeros(0, dtype=np.float32)
        resampler = self._resampler  # close() may drop it from another thread
        if resampler is not None:
            block = resampler.resample_chunk(block)
        return block

    def _check_alive(self) -> None:
        stalled = time.monotonic() - self._last_callback > STALL_S
        if not self._closed and (stalled or not self._stream.active):
            raise AudioDeviceError(
                f"microphone {self.info.name!r} stopped delivering audio (unplugged?); {DEVICES_HINT}"
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _close_stream(self._stream)
            # soxr's streams are native (nanobind) objects: one still referenced at exit, e.g. from the
            # daemon thread reading typed turns, makes the interpreter print "nanobind: leaked" lines
            self._resampler = None


class Speaker(BufferedSink):
    """Plays 22.05 kHz float32 blocks on an output device through a PlaybackBuffer.

    The buffer holds 22.05 kHz audio; when the device cannot play that rate, the callback
    resamples what it pulls (soxr, streaming). Resampling on the pull side keeps the resampler fed
    with silence between answers, so its filter delay is a fixed few milliseconds of latency and
    never holds back the end of an answer.
    """

    def __init__(self, device: DeviceSpec = None, sample_rate: int = SAMPLE_RATE_OUT,
                 block_ms: int = PLAYBACK_BLOCK_MS, on_played: PlayedTap | None = None) -> None:
        sd = import_sounddevice()
        self.info = resolve_device(device, "output")
        self.sample_rate = sample_rate
        self.device_rate = _pick_rate(sd, self.info, sample_rate, "output")
        self.buffer = PlaybackBuffer(sample_rate, on_played=on_played)
        self.underflows = 0  # callbacks PortAudio reported as late
        self._resampler = soxr_stream(sample_rate, self.device_rate)
        self._resampled = np.zeros(0, dtype=np.float32)  # device-rate samples not yet output
        self._pull_block = sample_rate * block_ms // 1000
        self._closed = False
        self._last_callback = time.monotonic()
        try:
            self._stream = sd.OutputStream(samplerate=self.device_rate,
                                           blocksize=self.device_rate * block_ms // 1000,
                                           device=self.info.index, channels=1, dtype="float32",
                                           callback=self._callback)
            self._stream.start()
        except (sd.PortAudioError, ValueError) as e:
            raise AudioDeviceError(f"cannot open speaker {self.info.name!r}: {e} ({DEVICES_HINT})") from e

    def _callback(self, outdata: np.ndarray, frames: int, when: Any, status: Any) -> None:
        self._last_callback = time.monotonic()
        if status and getattr(status, "output_underflow", False):
            self.underflows += 1
        outdata[:, 0] = self._next(frames)

    def _next(self, frames: int) -> np.ndarray:
        """(frames,) float32 at the device rate."""
        resampler = self._resampler  # close() may drop it while a last callback runs
        if resampler is None:
            return self.buffer.pull(frames)
        while len(self._resampled) < frames:
            more = resampler.resample_chunk(self.buffer.pull(self._pull_block))
            self._resampled = np.concatenate([self._resampled, more])
        out, self._resampled = self._resampled[:frames], self._resampled[frames:]
        return out

    def write(self, block: np.ndarray) -> None:
        stalled = time.monotonic() - self._last_callback > STALL_S
        if not self._closed and (stalled or not self._stream.active):
            raise AudioDeviceError(f"speaker {self.info.name!r} stopped playing (unplugged?); {DEVICES_HINT}")
        super().write(block)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _close_stream(self._stream)
            # soxr's streams are native (nanobind) objects: one still referenced at exit, e.g. from the
            # daemon thread reading typed turns, makes the interpreter print "nanobind: leaked" lines
            self._resampler = None


def _defaults(sd: ModuleType) -> tuple[int, int]:
    """(default input index, default output index); -1 where there is none."""
    default = sd.default.device
    try:
        return int(default[0]), int(default[1])
    except (TypeError, IndexError):
        return -1, -1


def _channels(info: DeviceInfo, kind: Kind) -> int:
    return info.max_input_channels if kind == "input" else info.max_output_channels


def _pick_rate(sd: ModuleType, info: DeviceInfo, wanted: int, kind: Kind) -> int:
    """``wanted`` Hz if the device takes it, else its default rate (we resample)."""
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=info.index, channels=1, dtype="float32", samplerate=wanted)
        return wanted
    except (sd.PortAudioError, ValueError):
        return int(info.default_sample_rate)


def _close_stream(stream: Any) -> bool:
    """Stop and close, ignoring a device that is already gone; never blocks for more than CLOSE_TIMEOUT_S.

    PortAudio's stop can wait forever on a device that vanished mid-stream, so it runs on a daemon thread and
    a stuck one is left behind (the OS reclaims it at exit). Returns False when it had to be left.
    """
    def close() -> None:
        with contextlib.suppress(Exception):  # PortAudio errors on an unplugged device do not matter here
            stream.stop()
            stream.close()

    closer = threading.Thread(target=close, name="glmvoice-audio-close", daemon=True)
    closer.start()
    closer.join(CLOSE_TIMEOUT_S)
    if not closer.is_alive():
        return True
    log.info("the audio stream did not close within %.1f s (device lost?); left to the OS", CLOSE_TIMEOUT_S)
    _skip_portaudio_exit()
    return False


def _skip_portaudio_exit() -> None:
    """sounddevice terminates PortAudio at exit, which would block on the stuck stream: skip it."""
    sd = sys.modules.get("sounddevice")
    handler = getattr(sd, "_exit_handler", None)
    if callable(handler):
        atexit.unregister(handler)
