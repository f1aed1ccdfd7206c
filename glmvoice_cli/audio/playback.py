"""The playback buffer between the decoder and the speaker, and the clocks that drive fake devices.

The decoder writes blocks whenever they are ready; the output device (a sounddevice callback, or
a fake sink ticking on a clock) pulls a fixed number of samples at its own pace. When the next
block is late the device gets silence, never stale or random samples, and playback simply
resumes when it arrives. `flush()` drops everything queued at once (barge-in), and `played`
counts the written samples that actually went out: what the user heard, used to trim the history.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

PlayedTap = Callable[[np.ndarray, int], None]  # (block (n,) float32 as output, sample rate Hz)


class PlaybackBuffer:
    """A thread-safe FIFO of float32 samples with silence on underrun."""

    def __init__(self, sample_rate: int, on_played: PlayedTap | None = None) -> None:
        self.sample_rate = sample_rate  # Hz, of both writes and pulls
        self.on_played = on_played  # sees every pulled block, silence included (echo reference)
        self._blocks: deque[np.ndarray] = deque()
        self._head = 0  # samples of _blocks[0] already pulled
        self._queued = 0  # samples written and not yet pulled
        self._lock = threading.Lock()
        self.played = 0  # written samples that were output
        self.position = 0  # every sample output, silence included (the device timeline)
        self.dropped = 0  # samples removed unplayed by flush()
        self.underruns = 0  # pulls that ran dry part-way through a block

    @property
    def pending(self) -> int:
        """Samples written and not yet played."""
        with self._lock:
            return self._queued

    def write(self, block: np.ndarray) -> None:
        """Queue (n,) float samples for playback; returns at once."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        if len(block) == 0:
            return
        with self._lock:
            self._blocks.append(block.copy())
            self._queued += len(block)

    def flush(self) -> int:
        """Drop everything queued (barge-in); returns the number of samples dropped."""
        with self._lock:
            dropped = self._queued
            self._blocks.clear()
            self._head = self._queued = 0
            self.dropped += dropped
        return dropped

    def pull(self, n: int) -> np.ndarray:
        """The next (n,) float32 samples to output: queued audio, then zeros if it runs out."""
        out = np.zeros(n, dtype=np.float32)
        with self._lock:
            filled = 0
            while filled < n and self._blocks:
                head = self._blocks[0]
                take = min(n - filled, len(head) - self._head)
                out[filled : filled + take] = head[self._head : self._head + take]
                filled += take
                self._head += take
                if self._head == len(head):
                    self._blocks.popleft()
                    self._head = 0
            self._queued -= filled
            self.played += filled
            self.position += n
            if 0 < filled < n:
                self.underruns += 1
        if self.on_played is not None:
            self.on_played(out, self.sample_rate)
        return out


class BufferedSink:
    """The sink methods of every speaker (real or fake) that plays from a PlaybackBuffer."""

    buffer: PlaybackBuffer

    def write(self, block: np.ndarray) -> None:
        self.buffer.write(block)

    def flush(self) -> int:
        return self.buffer.flush()

    @property
    def played(self) -> int:
        return self.buffer.played

    @property
    def pending(self) -> int:
        return self.buffer.pending


class Clock(Protocol):
    """Seconds since the clock started; fake devices pace themselves with it."""

    def now(self) -> float: ...

    def wait_until(self, t: float) -> None:
        """Return once the clock has reached ``t`` seconds."""


class RealClock:
    """Wall time (monotonic), starting at 0 when created."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def restart(self) -> None:
        """Time 0 is now (a file microphone starts playing when the models are ready, not while they load)."""
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)


class VirtualClock:
    """Time that moves only when someone waits: tests run a whole conversation in no wall time.

    Listeners (fake sinks) are called with the new time after every advance, in the waiting
    thread, so what the "speaker" played is always up to date when the "microphone" reads.
    """

    def __init__(self) -> None:
        self._t = 0.0
        self._listeners: list[Callable[[float], None]] = []
        self._lock = threading.RLock()

    def now(self) -> float:
        return self._t

    def subscribe(self, listener: Callable[[float], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[float], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def wait_until(self, t: float) -> None:
        self.advance_to(t)

    def advance_to(self, t: float) -> None:
        with self._lock:
            if t <= self._t:
                return
            self._t = t
            listeners = list(self._listeners)
        for listener in listeners:
            listener(t)

    def advance(self, seconds: float) -> None:
        self.advance_to(self._t + seconds)
