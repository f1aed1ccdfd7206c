"""Echo cancellation: remove the assistant's own voice from the microphone before the VAD hears it.

The speaker's output (every block the playback buffer pulls, silences included) is the
reference ("far end"); the microphone is the "near end". Three cancellers share one protocol:

- `WebRtcEchoCanceller`: WebRTC's audio processing module (AEC3: adaptive filter, delay
  estimation, residual echo suppression) as shipped by the `livekit` package
  (`rtc.AudioProcessingModule`). It runs offline, in-process, on 10 ms int16 frames.
- `NlmsEchoCanceller`: a pure-numpy partitioned-block frequency-domain NLMS filter, the fallback
  where livekit is not installed. Linear only: less suppression, no double-talk handling.
- `NullEchoCanceller`: passes the microphone through (`--headphones`: no acoustic echo to remove).

After either adaptive canceller, an `EchoGate` (see echo_gate.py) attenuates what is left of the
echo while the filter is still learning, so the VAD cannot mistake it for the user (``gate=False``
turns it off, to measure the canceller alone).

Both sides are buffered into 10 ms frames; `process` returns every complete frame it can clean,
so blocks of a multiple of 10 ms (the 30 ms capture blocks) usually come back whole, at once (the
NLMS filter may hold a frame back, up to 50 ms, until its reference has arrived). The reference
is resampled to the microphone rate by a causal polyphase filter (1.5 ms delay): an echo that
reaches the microphone before its reference cannot be cancelled.
"""

from __future__ import annotations

import threading
from collections import deque
from types import ModuleType
from typing import Any, Literal, Protocol

import numpy as np

from glmvoice_cli.audio.echo_gate import EchoGate
from glmvoice_cli.audio.stream_resample import StreamResampler
from glmvoice_cli.config import SAMPLE_RATE_IN
from glmvoice_cli.errors import GlmVoiceError, UsageError

EchoMode = Literal["auto", "webrtc", "nlms", "off"]

FRAME_MS = 10  # the audio processing module takes exactly 10 ms frames
APM_RATES = (16_000, 32_000, 48_000)  # Hz, rates the module's full-band path accepts
INT16_SCALE = 32_767
REFERENCE_QUEUE_S = 2.0  # far-end audio kept while the microphone side lags; older is dropped
MAX_HOLD_FRAMES = 5  # NLMS: microphone frames (50 ms) held back waiting for their reference
MAX_LEAD_FRAMES = 3  # NLMS: reference frames (30 ms) allowed ahead of the microphone (jitter)
NLMS_TAIL_MS = 200  # echo path length the NLMS filter models (speaker -> room -> microphone)
NLMS_STEP = 1.0  # normalized step size (0 < mu < 2): fastest convergence near 1
NLMS_POWER_SMOOTHING = 0.9  # per-bin far-end power estimate: weight of the past
NLMS_REGULARIZATION = 1e-6  # added to the power estimate: no blow-up on a silent reference
GUARD_SMOOTHING = 0.7  # error energies compared by the double-talk guard: weight of the past
GUARD_PROMOTE_RATIO = 0.5  # background error 3 dB below the foreground's: it is the better filter
GUARD_PROMOTE_BLOCKS = 3  # ... for 30 ms in a row before it replaces the foreground
GUARD_RESET_RATIO = 4.0  # background error 6 dB above the foreground's: it diverged (double talk)
LIVEKIT_HINT = "pip install 'glmvoice[aec]', or use --headphones to turn echo cancellation off"


class EchoCanceller(Protocol):
    """Removes the echo of ``reference`` audio from captured audio at ``sample_rate``."""

    sample_rate: int

    def reference(self, played: np.ndarray, sample_rate: int) -> None:
        """(n,) float32 the speaker just played, at its own rate; thread-safe (audio callback)."""
        ...

    def process(self, captured: np.ndarray) -> np.ndarray:
        """(n,) float32 microphone samples -> (m,) cleaned samples, m = whole 10 ms frames ready."""
        ...

    def reset(self) -> None: ...


class NullEchoCanceller:
    """No echo path (headphones): the microphone passes through unchanged."""

    def __init__(self, sample_rate: int = SAMPLE_RATE_IN) -> None:
        self.sample_rate = sample_rate

    def reference(self, played: np.ndarray, sample_rate: int) -> None:
        pass

    def process(self, captured: np.ndarray) -> np.ndarray:
        return np.asarray(captured, dtype=np.float32).reshape(-1)

    def reset(self) -> None:
        pass


class _FramedCanceller:
    """Shared plumbing: reference resampling and queueing, 10 ms framing of both sides.

    Reference frames wait in a queue until microphone frames come to take them. ``pairs``
    chooses how: False gives each microphone frame every queued reference frame (AEC3 aligns the
    two itself); True pairs them one to one, holding microphone frames back (at most
    ``MAX_HOLD_FRAMES``) while the reference lags, and dropping the oldest reference frames when it
    leads by more than ``MAX_LEAD_FRAMES``: the echo of what was just played is the one to cancel.
    """

    pairs = False

    def __init__(self, sample_rate: int, gate: bool = True) -> None:
        self.sample_rate = sample_rate
        self.frame = sample_rate * FRAME_MS // 1_000
        self.gate = EchoGate() if gate else None  # residual-echo gate (the double-talk guard)
        self._lock = threading.Lock()
        self._resamplers: dict[int, StreamResampler] = {}
        self._far: deque[np.ndarray] = deque(maxlen=int(REFERENCE_QUEUE_S * 1_000 / FRAME_MS))
        self._far_pending = np.zeros(0, dtype=np.float32)
        self._far_seen = False  # a reference has arrived since the last reset
        self._near: deque[np.ndarray] = deque()  # whole microphone frames waiting for a reference
        self._near_pending = np.zeros(0, dtype=np.float32)

    def reference(self, played: np.ndarray, sample_rate: int) -> None:
        played = np.asarray(played, dtype=np.float32).reshape(-1)
        with self._lock:
            if sample_rate != self.sample_rate:
                if sample_rate not in self._resamplers:
                    self._resamplers[sample_rate] = StreamResampler(sample_rate, self.sample_rate)
                played = self._resamplers[sample_rate](played)
            self._far_seen = True
            data = np.concatenate([self._far_pending, played])
            whole = len(data) - len(data) % self.frame
            self._far.extend(data[:whole].reshape(-1, self.frame))
            self._far_pending = data[whole:]

    def process(self, captured: np.ndarray) -> np.ndarray:
        data = np.concatenate([self._near_pending, np.asarray(captured, dtype=np.float32).reshape(-1)])
        whole = len(data) - len(data) % self.frame
        self._near_pending = data[whole:]
        self._near.extend(data[:whole].reshape(-1, self.frame))
        out = []
        while self._near:
            far = self._take_far()
            if far is None:
                break
            cleaned = self._process_frame(self._near.popleft(), far)
            out.append(self.gate(cleaned, far) if self.gate is not None else cleaned)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def _take_far(self) -> list[np.ndarray] | None:
        """Reference frames for the next microphone frame; None: hold it until more reference comes."""
        with self._lock:
            if not self.pairs:
                frames = list(self._far)
                self._far.clear()
                return frames
            while len(self._far) > MAX_LEAD_FRAMES:
                self._far.popleft()
            if self._far:
                return [self._far.popleft()]
        if not self._far_seen or len(self._near) > MAX_HOLD_FRAMES:  # no speaker running: no echo
            return [np.zeros(self.frame, dtype=np.float32)]
        return None

    def _process_frame(self, near: np.ndarray, far: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def reset(self) -> None:
        with self._lock:
            self._resamplers.clear()
            self._far.clear()
            self._far_pending = np.zeros(0, dtype=np.float32)
            self._far_seen = False
        self._near.clear()
        if self.gate is not None:
            self.gate.reset()
        self._near_pending = np.zeros(0, dtype=np.float32)


class WebRtcEchoCanceller(_FramedCanceller):
    """WebRTC AEC3 through livekit's `rtc.AudioProcessingModule` (imported on creation).

    Every queued reference frame goes in as the reverse stream before each microphone frame; AEC3
    estimates the speaker-to-microphone delay itself, ``stream_delay_ms`` is only its hint.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE_IN, gate: bool = True, stream_delay_ms: int = 0,
                 noise_suppression: bool = False) -> None:
        if sample_rate not in APM_RATES:
            raise UsageError(f"WebRTC echo cancellation needs {APM_RATES} Hz, not {sample_rate}")
        super().__init__(sample_rate, gate)
        self._rtc = _import_livekit_rtc()
        self.stream_delay_ms = stream_delay_ms
        self._noise_suppression = noise_suppression
        self._apm = self._new_apm()

    def _new_apm(self) -> Any:
        return self._rtc.AudioProcessingModule(echo_cancellation=True,
                                               noise_suppression=self._noise_suppression)

    def _process_frame(self, near: np.ndarray, far: list[np.ndarray]) -> np.ndarray:
        for block in far:
            self._apm.process_reverse_stream(self._frame_of(block))
        frame = self._frame_of(near)
        self._apm.set_stream_delay_ms(self.stream_delay_ms)
        self._apm.process_stream(frame)  # in place
        return np.frombuffer(frame.data, dtype=np.int16).astype(np.float32) / INT16_SCALE

    def _frame_of(self, samples: np.ndarray) -> Any:
        pcm = (np.clip(samples, -1.0, 1.0) * INT16_SCALE).astype(np.int16)
        return self._rtc.AudioFrame(bytearray(pcm.tobytes()), self.sample_rate, 1, len(pcm))

    def reset(self) -> None:
        super().reset()
        self._apm = self._new_apm()


class NlmsEchoCanceller(_FramedCanceller):
    """Partitioned-block frequency-domain NLMS (overlap-save, constrained gradient), 10 ms blocks,
    with a two-path double-talk guard.

    The echo path is modelled as ``NLMS_TAIL_MS`` of FIR filter split into 10 ms partitions, each
    adapted in the frequency domain with a per-bin normalized step. The adaptive ("background")
    filter is copied to the one that cleans the output ("foreground") only while it removes
    clearly more echo; when the user talks over the assistant (double talk) the background filter
    is disturbed, loses that comparison and is reset from the foreground, so the output never
    inherits a diverged filter. One reference frame is paired with each microphone frame: the
    reference must arrive no later than its echo.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE_IN, gate: bool = True, tail_ms: int = NLMS_TAIL_MS,
                 step: float = NLMS_STEP) -> None:
        super().__init__(sample_rate, gate)
        self.partitions = -(-tail_ms // FRAME_MS)
        self.step = step
        self._init_filter()

    def _init_filter(self) -> None:
        n, bins = self.frame, self.frame + 1
        self._weights = np.zeros((self.partitions, bins), dtype=np.complex128)  # (P, N+1) background
        self._fixed = self._weights.copy()  # (P, N+1) foreground
        self._spectra = np.zeros((self.partitions, bins), dtype=np.complex128)  # far-end, newest first
        self._power = np.zeros(bins)  # (N+1,) smoothed far-end power per bin
        self._previous = np.zeros(n)  # the last far-end block (overlap-save)
        self._energy = np.zeros(2)  # smoothed error energy: (foreground, background)
        self._better = 0  # blocks in a row where the background filter won

    pairs = True

    def _process_frame(self, near: np.ndarray, far_frames: list[np.ndarray]) -> np.ndarray:
        (far,) = far_frames
        spectrum = np.fft.rfft(np.concatenate([self._previous, far]))  # (N+1,)
        self._previous = far.astype(np.float64)
        self._spectra = np.roll(self._spectra, 1, axis=0)
        self._spectra[0] = spectrum
        fixed_out = near - self._echo(self._fixed)
        error = near - self._echo(self._weights)
        self._adapt(spectrum, error)
        self._guard(fixed_out, error)
        return fixed_out.astype(np.float32)

    def _echo(self, weights: np.ndarray) -> np.ndarray:
        """(N,) echo estimate of the current block through ``weights``."""
        return np.fft.irfft((weights * self._spectra).sum(axis=0), 2 * self.frame)[self.frame :]

    def _adapt(self, spectrum: np.ndarray, error: np.ndarray) -> None:
        n = self.frame
        self._power = NLMS_POWER_SMOOTHING * self._power + (1 - NLMS_POWER_SMOOTHING) * np.abs(spectrum) ** 2
        error_spectrum = np.fft.rfft(np.concatenate([np.zeros(n), error]))
        norm = self.partitions * self._power + NLMS_REGULARIZATION
        gradient = np.conj(self._spectra) * error_spectrum / norm  # (P, N+1)
        taps = np.fft.irfft(gradient, 2 * n, axis=1)[:, :n]  # keep the causal half: linear, not circular
        self._weights += self.step * np.fft.rfft(taps, 2 * n, axis=1)

    def _guard(self, fixed_out: np.ndarray, error: np.ndarray) -> None:
        """Two-path logic: promote a background filter that keeps winning, reset one that diverged."""
        energy = np.array([np.mean(fixed_out**2), np.mean(error**2)])
        self._energy = GUARD_SMOOTHING * self._energy + (1 - GUARD_SMOOTHING) * energy
        fixed_energy, adaptive_energy = self._energy
        if adaptive_energy < fixed_energy * GUARD_PROMOTE_RATIO:
            self._better += 1
            if self._better >= GUARD_PROMOTE_BLOCKS:
                self._fixed = self._weights.copy()
                self._energy[0] = self._energy[1]
        else:
            self._better = 0
        if adaptive_energy > fixed_energy * GUARD_RESET_RATIO:
            self._weights = self._fixed.copy()
            self._energy[1] = self._energy[0]

    def reset(self) -> None:
        super().reset()
        self._init_filter()


def make_echo_canceller(mode: EchoMode = "auto", sample_rate: int = SAMPLE_RATE_IN,
                        gate: bool = True) -> EchoCanceller:
    """"off" -> pass-through; "webrtc" -> AEC3 (needs livekit); "nlms" -> numpy fallback;
    "auto" -> AEC3 where livekit imports, else NLMS. ``gate``: add the residual-echo gate."""
    if mode == "off":
        return NullEchoCanceller(sample_rate)
    if mode == "nlms":
        return NlmsEchoCanceller(sample_rate, gate)
    if mode == "webrtc":
        return WebRtcEchoCanceller(sample_rate, gate)
    if mode == "auto":
        use_webrtc = webrtc_available()
        return (WebRtcEchoCanceller if use_webrtc else NlmsEchoCanceller)(sample_rate, gate)
    raise UsageError(f"unknown echo cancellation mode {mode!r} (auto, webrtc, nlms or off)")


def webrtc_available() -> bool:
    try:
        _import_livekit_rtc()
    except GlmVoiceError:
        return False
    return True


def _import_livekit_rtc() -> ModuleType:
    try:
        from livekit import rtc
    except (ImportError, OSError) as e:  # OSError: the bundled FFI library failed to load
        raise GlmVoiceError(f"WebRTC echo cancellation is unavailable: {e} ({LIVEKIT_HINT})") from e
    if not hasattr(rtc, "AudioProcessingModule"):
        raise GlmVoiceError(f"the installed livekit has no AudioProcessingModule ({LIVEKIT_HINT})")
    return rtc
