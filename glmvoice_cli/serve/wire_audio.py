"""Audio between the wire (PCM16 at 24 kHz) and the models (16 kHz in, 22.05 kHz out), and a clocked sink.

The client plays the answer's audio; the server only sends it. `ClientPlayback` stands in for the
speaker in the conversation core: it assumes the client plays what it was sent at real-time pace from the
moment it arrives (as the official clients do), so `played` is the server's best guess of what was heard
when its own VAD hears the user cut in. A client that knows better says so with
`conversation.item.truncate`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import soxr

from glmvoice_cli.audio.stream_resample import soxr_stream
from glmvoice_cli.config import SAMPLE_RATE_IN, SAMPLE_RATE_OUT
from glmvoice_cli.serve.protocol import WIRE_RATE


class WireInput:
    """24 kHz wire audio -> 16 kHz model audio, streaming (state kept between blocks)."""

    def __init__(self) -> None:
        self._stream = _stream(WIRE_RATE, SAMPLE_RATE_IN)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        return _resample(self._stream, samples)

    def finish(self) -> np.ndarray:
        """The samples the filter still holds (the end of a push-to-talk turn), and a fresh start."""
        tail = _resample(self._stream, np.zeros(0, np.float32), last=True)
        self._stream.clear()
        return tail

    def reset(self) -> None:
        self._stream.clear()


class WireOutput:
    """One answer's 22.05 kHz audio -> 24 kHz wire audio, streaming; `finish()` gives the filter's tail."""

    def __init__(self) -> None:
        self._stream = _stream(SAMPLE_RATE_OUT, WIRE_RATE)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        return _resample(self._stream, samples)

    def finish(self) -> np.ndarray:
        return _resample(self._stream, np.zeros(0, np.float32), last=True)


def _stream(rate_in: int, rate_out: int) -> soxr.ResampleStream:
    stream = soxr_stream(rate_in, rate_out)
    assert stream is not None  # the wire's rate is neither model rate
    return stream


def _resample(stream: soxr.ResampleStream, samples: np.ndarray, last: bool = False) -> np.ndarray:
    return np.asarray(stream.resample_chunk(samples.astype(np.float32), last=last), dtype=np.float32).reshape(-1)


class ClientPlayback:
    """An `AudioSink` for a remote client: writes leave at once; `played` follows the wall clock.

    Playback is modelled as a queue drained at `sample_rate` from the first write after it ran dry.
    `now` is injectable for tests.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE_OUT, now: Callable[[], float] = time.monotonic) -> None:
        self.sample_rate = sample_rate
        self._now = now
        self._lock = threading.Lock()
        self._written = 0
        self._dropped = 0
        self._ends_at = 0.0  # when the audio sent so far will have played out

    def write(self, block: np.ndarray) -> None:
        n = len(block)
        if n == 0:
            return
        with self._lock:
            now = self._now()
            self._ends_at = max(self._ends_at, now) + n / self.sample_rate
            self._written += n

    def _pending_locked(self) -> int:
        left = self._ends_at - self._now()
        return min(self._written - self._dropped, max(0, round(left * self.sample_rate)))

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending_locked()

    @property
    def played(self) -> int:
        with self._lock:
            return self._written - self._dropped - self._pending_locked()

    def flush(self) -> int:
        """Barge-in: what was not yet played counts as never heard (the client is told to stop)."""
        with self._lock:
            dropped = self._pending_locked()
            self._dropped += dropped
            self._ends_at = self._now()
            return dropped

    def close(self) -> None:
        pass
