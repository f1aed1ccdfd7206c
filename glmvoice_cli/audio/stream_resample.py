"""A low-latency streaming resampler for the echo canceller's reference signal.

soxr's streaming resamplers hold back 10-30 ms of output (their filters look ahead). For the
echo reference that is fatal: the echo of a played block can reach the microphone sooner than
that, and an echo canceller cannot model an echo that arrives before its reference. This
polyphase FIR is causal in its input: output sample j needs only input samples up to
floor(j * down / up), so every input block yields its outputs at once, at the price of a fixed
delay of ``HALF_TAPS`` input samples (1.5 ms at 22.05 kHz), which the canceller simply models.
"""

from __future__ import annotations

from math import gcd
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import soxr

SOXR_QUALITY = "HQ"  # soxr's streams (devices, the Realtime wire): quality over the last ms of latency
HALF_TAPS = 32  # input samples on each side of the filter centre: ~1.5 ms latency at 22.05 kHz
KAISER_BETA = 8.6  # about 85 dB stopband
CUTOFF_FRACTION = 0.45  # passband edge, as a fraction of the lower of the two rates


class StreamResampler:
    """Feed (n,) float32 blocks at ``rate_in``; get every output sample they complete at ``rate_out``."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        common = gcd(rate_in, rate_out)
        self.up, self.down = rate_out // common, rate_in // common
        taps = 2 * HALF_TAPS
        prototype = lowpass(taps * self.up, CUTOFF_FRACTION * min(rate_in, rate_out), rate_in * self.up)
        prototype *= self.up  # zero-stuffing by `up` divides the gain by `up`
        # (up, taps): row r holds the taps that meet the input samples for output phase r
        self._bank = prototype.reshape(taps, self.up).T.astype(np.float64)
        self._history = np.zeros(taps - 1)  # the last taps-1 input samples (zeros before the start)
        self._consumed = 0  # input samples received
        self._produced = 0  # output samples emitted

    def __call__(self, block: np.ndarray) -> np.ndarray:
        """(n,) input samples -> (m,) float32 output samples, m ~ n * up / down."""
        block = np.asarray(block, dtype=np.float64).reshape(-1)
        taps = self._bank.shape[1]
        data = np.concatenate([self._history, block])  # data[i] = input sample consumed - (taps-1) + i
        base = self._consumed - (taps - 1)
        self._consumed += len(block)
        # output j is complete once input floor(j * down / up) has arrived
        last = (self._consumed * self.up - 1) // self.down  # largest j with j*down//up < consumed
        outputs = np.arange(self._produced, last + 1)
        self._produced = last + 1
        self._history = data[len(data) - (taps - 1) :]
        if len(outputs) == 0:
            return np.zeros(0, dtype=np.float32)
        newest = outputs * self.down // self.up  # (m,) newest input sample each output needs
        phase = outputs * self.down - newest * self.up  # (m,) in [0, up)
        index = newest[:, None] - np.arange(taps)[None, :] - base  # (m, taps) into data
        return np.einsum("mt,mt->m", data[index], self._bank[phase]).astype(np.float32)


def lowpass(n: int, cutoff: float, rate: float) -> np.ndarray:
    """(n,) linear-phase Kaiser-windowed sinc low-pass with unit DC gain (cutoff, rate in Hz)."""
    t = np.arange(n) - (n - 1) / 2
    h = np.sinc(2 * cutoff / rate * t) * np.kaiser(n, KAISER_BETA)
    return h / h.sum()


def soxr_stream(rate_in: int, rate_out: int) -> soxr.ResampleStream | None:
    """soxr's streaming resampler between two rates (it holds back 10-30 ms; see the module docstring), or None
    when they are equal."""
    import soxr  # here: the polyphase filter above is used where soxr may be missing (a bare GPU machine)

    if rate_in == rate_out:
        return None
    return soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality=SOXR_QUALITY)
