"""Devices without hardware: a file or an array as the microphone, a recorder as the speaker.

They implement `AudioSource` / `AudioSink` and pace themselves on a clock: `RealClock` plays a
file in real time (`--input-file`, `--output-file`), `VirtualClock` runs a whole conversation in
no wall time for tests. Both sides share the clock, so what the "speaker" played and what the
"microphone" heard sit on one sample timeline. `EchoLoop` mixes the speaker's output back into
the microphone with a delay and a gain: the assistant hears its own voice, as in a room.
"""

from __future__ import annotations

import threading
from math import gcd
from pathlib import Path

import numpy as np
import soxr

from glmvoice_cli.audio.io import load_audio, write_audio
from glmvoice_cli.audio.playback import (
    BufferedSink,
    Clock,
    PlaybackBuffer,
    PlayedTap,
    RealClock,
    VirtualClock,
)
from glmvoice_cli.config import SAMPLE_RATE_IN, SAMPLE_RATE_OUT

SOURCE_BLOCK_MS = 30  # fake microphone block: one VAD frame, like Microphone
SINK_TICK_S = 0.01  # real-time recorder: how often the fake device pulls from its buffer
ECHO_MARGIN_S = 0.02  # context around each echo block so the resampler sees no false edges
MS_PER_SECOND = 1_000


class ArraySource:
    """An array played as a microphone: block k is returned once the clock reaches its end."""

    def __init__(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE_IN,
                 clock: Clock | None = None, block_ms: int = SOURCE_BLOCK_MS) -> None:
        self.samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.sample_rate = sample_rate
        self.clock = clock if clock is not None else RealClock()
        self.block = sample_rate * block_ms // MS_PER_SECOND
        self.position = 0  # samples returned so far

    @property
    def ended(self) -> bool:
        return self.position >= len(self.samples)

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        if self.ended:
            return None
        end = min(self.position + self.block, len(self.samples))
        due = end / self.sample_rate
        if timeout is not None and due - self.clock.now() > timeout:
            self.clock.wait_until(self.clock.now() + timeout)
            return np.zeros(0, dtype=np.float32)
        self.clock.wait_until(due)
        block = self.samples[self.position : end]
        self.position = end
        return block.copy()

    def close(self) -> None:
        self.position = len(self.samples)


class FileSource(ArraySource):
    """An audio file (any format, rate or channels) played as a 16 kHz microphone."""

    def __init__(self, path: str | Path, clock: Clock | None = None, block_ms: int = SOURCE_BLOCK_MS,
                 sample_rate: int = SAMPLE_RATE_IN) -> None:
        audio = load_audio(path, sample_rate)
        super().__init__(audio.samples, sample_rate, clock, block_ms)
        self.path = Path(path)
        self.warnings = audio.warnings


class NullSink:
    """Discards audio; it counts as played the moment it is written."""

    def __init__(self, sample_rate: int = SAMPLE_RATE_OUT) -> None:
        self.sample_rate = sample_rate
        self._played = 0

    def write(self, block: np.ndarray) -> None:
        self._played += len(np.asarray(block).reshape(-1))

    def flush(self) -> int:
        return 0

    @property
    def played(self) -> int:
        return self._played

    @property
    def pending(self) -> int:
        return 0

    def close(self) -> None:
        pass


class RecordingSink(BufferedSink):
    """A fake speaker: records what a real one would play, silences included, on the clock's timeline.

    Sample i of the recording is what the speaker played at ``i / sample_rate`` seconds. On a
    VirtualClock it pulls whenever time advances; on a RealClock a thread pulls every 10 ms, as a
    device callback would. ``close()`` writes the wav when a path was given.
    """

    def __init__(self, path: str | Path | None = None, sample_rate: int = SAMPLE_RATE_OUT,
                 clock: Clock | None = None, on_played: PlayedTap | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.sample_rate = sample_rate
        self.clock = clock if clock is not None else RealClock()
        self.buffer = PlaybackBuffer(sample_rate, on_played=on_played)
        self._timeline = np.zeros(sample_rate, dtype=np.float32)  # grows by doubling
        self._length = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0  # samples ever written (flushed ones included): no audio, no file
        if isinstance(self.clock, VirtualClock):
            self.clock.subscribe(self.advance_to)
        else:
            self._thread = threading.Thread(target=self._tick, name="recording-sink", daemon=True)
            self._thread.start()

    def write(self, block: np.ndarray) -> None:
        self.written += int(np.asarray(block).size)
        super().write(block)

    def advance_to(self, t: float) -> None:
        """Play everything due up to ``t`` seconds on the timeline."""
        with self._lock:
            n = int(t * self.sample_rate) - self._length
            if n <= 0:
                return
            if self._length + n > len(self._timeline):
                grown = np.zeros(max(2 * len(self._timeline), self._length + n), dtype=np.float32)
                grown[: self._length] = self._timeline[: self._length]
                self._timeline = grown
            self._timeline[self._length : self._length + n] = self.buffer.pull(n)
            self._length += n

    def restart(self) -> None:
        """The clock was restarted: forget the silence recorded so far (nothing had been written)."""
        with self._lock:
            self._length = 0

    def _tick(self) -> None:
        while not self._stop.wait(SINK_TICK_S):
            self.advance_to(self.clock.now())

    @property
    def length(self) -> int:
        """Samples on the timeline so far."""
        return self._length

    def recording(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """(end - start,) float32: what was played from sample ``start`` to ``end``; zeros past the
        timeline (not played yet) or before 0."""
        with self._lock:
            end = self._length if end is None else end
            out = np.zeros(max(end - start, 0), dtype=np.float32)
            lo, hi = max(start, 0), min(end, self._length)
            if hi > lo:
                out[lo - start : hi - start] = self._timeline[lo:hi]
        return out

    def close(self) -> None:
        """Stop the clock ticks (the final timeline stays readable) and write the file, only if any audio was
        ever written to this speaker: a run stopped before the first answer leaves an existing file as it was."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.advance_to(self.clock.now())
        if isinstance(self.clock, VirtualClock):
            self.clock.unsubscribe(self.advance_to)
        if self.path is not None and self.written > 0:
            write_audio(self.path, self.recording(), self.sample_rate)


class EchoLoop:
    """A microphone that also hears the speaker: source + gain x (speaker output, ``delay_s`` ago).

    Wraps any AudioSource and a RecordingSink on the same clock; the echo is resampled from the
    speaker's rate to the source's. Use a delay of at least a block (30 ms) in real time, so the
    echoed audio has been played when the microphone block is read.
    """

    def __init__(self, source: ArraySource, sink: RecordingSink, delay_s: float = 0.05,
                 gain: float = 0.5) -> None:
        self.source = source
        self.sink = sink
        self.sample_rate = source.sample_rate
        self.delay = round(delay_s * self.sample_rate)  # samples at the source rate
        self.gain = gain
        self.position = 0  # source samples returned so far
        common = gcd(sink.sample_rate, self.sample_rate)
        self._unit_in = sink.sample_rate // common  # e.g. 441 samples at 22.05 kHz ...
        self._unit_out = self.sample_rate // common  # ... are exactly 320 at 16 kHz
        self._margin = round(ECHO_MARGIN_S * self.sample_rate)

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        block = self.source.read(timeout)
        if block is None or len(block) == 0:
            return block
        start = self.position
        self.position += len(block)
        if self.gain == 0.0:
            return block
        return block + self.gain * self.played_at(start - self.delay, len(block))

    def played_at(self, start: int, n: int) -> np.ndarray:
        """(n,) float32: the speaker's output from sample ``start`` on the source-rate timeline."""
        lo = max(start - self._margin, 0) // self._unit_out
        hi = -(-(start + n + self._margin) // self._unit_out)
        if start + n <= 0:
            return np.zeros(n, dtype=np.float32)
        played = self.sink.recording(lo * self._unit_in, hi * self._unit_in)
        if self.sink.sample_rate != self.sample_rate:
            played = soxr.resample(played, self.sink.sample_rate, self.sample_rate, quality="HQ")
        out = np.zeros(n, dtype=np.float32)
        first = lo * self._unit_out  # source-rate sample of played[0]
        src_lo, src_hi = max(start, first), min(start + n, first + len(played))
        if src_hi > src_lo:
            out[src_lo - start : src_hi - start] = played[src_lo - first : src_hi - first]
        return out

    def close(self) -> None:
        self.source.close()
