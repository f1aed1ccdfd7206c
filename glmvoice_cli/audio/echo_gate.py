"""A residual-echo gate: the double-talk guard between the echo canceller and the VAD.

An adaptive canceller needs a few hundred milliseconds of the assistant's voice before it removes
much (AEC3 about 30 dB after a second of noise, less on a clean harmonic voice; NLMS slower), and
during that time the residue is loud enough to look like a user's onset. The gate tracks how
much of the reference still leaks through (the "coupling": cleaned energy / reference energy,
a decaying peak over frames the gate judged to be echo) and attenuates a cleaned frame unless it
is ``GATE_MARGIN_DB`` louder than that leak predicts. The user talking over the assistant is
louder than the leak and passes untouched; the leak itself never reaches the VAD.

The trade-off: while the assistant speaks, the user must be a few dB louder than the current
leak, so a very quiet barge-in early in the first answer may be missed. With no reference
playing (the assistant silent) the gate is open.
"""

from __future__ import annotations

from collections import deque

import numpy as np

GATE_MARGIN_DB = 6.0  # a frame passes when this much louder than the predicted residual echo
GATE_ATTENUATION_DB = 60.0  # applied to frames judged residual echo
REFERENCE_FLOOR = 1e-6  # mean-square reference energy (-60 dBFS) below which nothing is playing
ECHO_WINDOW_FRAMES = 20  # 200 ms: the echo in a frame may come from anything played this long before
COUPLING_INITIAL = 1.0  # before any evidence: assume the residue is as loud as the reference
COUPLING_RELEASE = 0.97  # per 10 ms frame: the coupling estimate falls ~13 dB/s as the canceller learns


class EchoGate:
    """Per 10 ms frame: attenuate what the residual echo explains, pass what it cannot."""

    def __init__(self, margin_db: float = GATE_MARGIN_DB, attenuation_db: float = GATE_ATTENUATION_DB) -> None:
        self.margin = 10 ** (margin_db / 10)  # energy ratio
        self.attenuation = 10 ** (-attenuation_db / 20)  # amplitude factor
        self.reset()

    def reset(self) -> None:
        self._recent: deque[float] = deque(maxlen=ECHO_WINDOW_FRAMES)  # per microphone frame
        self.reference_energy = 0.0  # the loudest reference mean-square in the echo window
        self.coupling = COUPLING_INITIAL  # residual echo energy / reference energy
        self.gated = 0  # frames attenuated so far

    def __call__(self, cleaned: np.ndarray, reference_frames: list[np.ndarray]) -> np.ndarray:
        """(N,) cleaned frame and the reference frames that came with it -> (N,) gated frame."""
        self._recent.append(max((float(np.mean(np.square(f))) for f in reference_frames), default=0.0))
        self.reference_energy = max(self._recent)
        if self.reference_energy < REFERENCE_FLOOR:
            return cleaned
        energy = float(np.mean(np.square(cleaned)))
        if energy > self.margin * self.coupling * self.reference_energy:
            return cleaned  # more than the leak explains: the user is talking
        ratio = energy / self.reference_energy
        self.coupling = max(self.coupling * COUPLING_RELEASE, ratio)
        self.gated += 1
        return (cleaned * self.attenuation).astype(np.float32)
