"""Turn segmentation: 16 kHz microphone samples in, speech onsets and whole utterances out.

`Segmenter` is a pure state machine. It cuts the incoming samples into fixed frames, asks a
per-frame classifier how likely the frame is speech (webrtcvad's yes/no as 1 or 0 by default, Silero VAD's
probability with `engine="silero"`, any callable in tests) and emits:

- `SpeechStarted` once an onset is confirmed by `start_frames` voiced frames in a row (a click or a
  cough shorter than that never starts a turn; barge-in listens to this event);
- `Utterance` when `hangover_ms` of non-speech has followed the last voiced frame, or when the turn
  reaches `max_turn_s` (then `truncated=True` and the next utterance continues seamlessly, with no
  new `SpeechStarted`);
- `SpeechDiscarded` when a confirmed onset ended up shorter than `min_turn_ms` of speech (or when
  the part after a max-length cut holds no speech at all: the long turn simply ended at the cut).

Every event carries sample positions on the input timeline (sample 0 = first sample pushed since the
last reset), so latencies can be measured without a clock. The utterance keeps `pre_roll_ms` of
audio before the onset, because the VAD fires only once the first syllable is well under way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from glmvoice_cli.config import SAMPLE_RATE_IN, WINDOW_SECONDS
from glmvoice_cli.errors import GlmVoiceError, UsageError

# (frame_samples,) int16 -> probability of speech in [0, 1] (a bool is read as 1 or 0)
FrameClassifier = Callable[[np.ndarray], float]

ENGINES = ("webrtc", "silero")
WEBRTC_FRAME_MS = (10, 20, 30)  # the only frame lengths webrtcvad accepts
WEBRTC_RATES = (8_000, 16_000, 32_000, 48_000)  # Hz, the only rates webrtcvad accepts
SILERO_FRAME_MS = 32  # Silero VAD reads windows of 512 samples at 16 kHz (256 at 8 kHz)
SILERO_RATES = (8_000, 16_000)  # Hz
# Silero's own hysteresis: a frame starts speech at 0.5 and, once in a turn, stays speech down to 0.35
DEFAULT_THRESHOLD = 0.5
HYSTERESIS = 0.15
DEFAULT_RELEASE = DEFAULT_THRESHOLD - HYSTERESIS
INT16_SCALE = 32_767  # float [-1, 1] -> int16 full scale
MS_PER_SECOND = 1_000


def release_for(threshold: float) -> float:
    """Silero's rule: once speaking, a frame stays speech down to 0.15 below the start threshold."""
    return max(threshold - HYSTERESIS, threshold / 2)


@dataclass(frozen=True)
class VadConfig:
    """How speech turns are found in the microphone stream."""

    engine: str = "webrtc"  # the frame classifier: "webrtc" (webrtcvad's GMM) or "silero" (Silero VAD, a small net)
    aggressiveness: int = 2  # webrtcvad mode: 0 keeps most audio as speech, 3 filters non-speech hardest
    frame_ms: int = 0  # classifier frame length; 0: the engine's (webrtc 30 of 10/20/30 ms, silero 32 ms)
    threshold: float = DEFAULT_THRESHOLD  # speech probability at which a frame starts speech
    release: float = DEFAULT_RELEASE  # in a turn, a frame counts as speech down to this probability
    start_frames: int = 3  # voiced frames in a row that confirm an onset (3 x 30 ms = 90 ms)
    hangover_ms: int = 700  # non-speech after the last voiced frame that ends the turn
    pre_roll_ms: int = 300  # audio kept before the onset, so the first syllable is not clipped
    post_roll_ms: int = 150  # audio kept after the last voiced frame (soft word endings)
    max_turn_s: float = WINDOW_SECONDS  # a turn this long (one tokenizer window) is cut and goes on as a new one
    min_turn_ms: int = 250  # confirmed onsets with less speech than this are discarded
    sample_rate: int = SAMPLE_RATE_IN  # Hz

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"VAD must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        silero = self.engine == "silero"
        if not self.frame_ms:
            object.__setattr__(self, "frame_ms", SILERO_FRAME_MS if silero else WEBRTC_FRAME_MS[-1])
        if self.aggressiveness not in (0, 1, 2, 3):
            raise UsageError(f"VAD aggressiveness must be 0, 1, 2 or 3, not {self.aggressiveness}")
        frames, rates = ((SILERO_FRAME_MS,), SILERO_RATES) if silero else (WEBRTC_FRAME_MS, WEBRTC_RATES)
        if self.frame_ms not in frames:
            raise UsageError(f"{self.engine} VAD frames are {' or '.join(map(str, frames))} ms, not {self.frame_ms}")
        if self.sample_rate not in rates:
            raise UsageError(f"{self.engine} VAD sample rate must be one of {rates} Hz, not {self.sample_rate}")
        if not 0.0 < self.release <= self.threshold <= 1.0:
            raise UsageError(f"VAD thresholds must satisfy 0 < release ({self.release}) <= threshold "
                             f"({self.threshold}) <= 1")
        if self.start_frames < 1:
            raise UsageError(f"VAD start frames must be at least 1, not {self.start_frames}")
        for name in ("hangover_ms", "pre_roll_ms", "post_roll_ms", "min_turn_ms"):
            if getattr(self, name) < 0:
                raise UsageError(f"VAD {name} must not be negative, not {getattr(self, name)}")
        if self.hangover_ms < self.frame_ms:
            raise UsageError(f"VAD hangover ({self.hangover_ms} ms) must be at least one frame ({self.frame_ms} ms)")
        if self.max_turn_s * MS_PER_SECOND < self.frame_ms * (self.start_frames + 1):
            raise UsageError(f"VAD max turn length {self.max_turn_s} s is shorter than an onset")

    @property
    def frame_samples(self) -> int:
        return self.sample_rate * self.frame_ms // MS_PER_SECOND

    def frames(self, ms: float) -> int:
        """Whole frames covering ``ms`` milliseconds (rounded up)."""
        return -(-round(ms) // self.frame_ms)

    def samples(self, ms: float) -> int:
        return round(ms * self.sample_rate / MS_PER_SECOND)


@dataclass(frozen=True)
class SpeechStarted:
    """A confirmed speech onset."""

    at_sample: int  # first sample of the first voiced frame of the confirming run
    confirmed_at: int  # sample just after the frame that confirmed it (when the event was decided)


@dataclass(frozen=True)
class Utterance:
    """One turn of speech, pre-roll and post-roll included."""

    samples: np.ndarray = field(repr=False)  # (end_sample - start_sample,) float32 at the config rate
    start_sample: int
    end_sample: int  # exclusive
    truncated: bool = False  # cut at max_turn_s; the speech goes on in the next utterance
    sample_rate: int = SAMPLE_RATE_IN  # Hz

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class SpeechDiscarded:
    """A confirmed onset that held less than min_turn_ms of speech (a cough, a door)."""

    start_sample: int
    end_sample: int


@dataclass(frozen=True)
class TurnAudio:
    """Samples just added to the turn in progress (with `stream_turns`): the pre-roll and onset frames at
    the onset, then every frame; all of a turn's TurnAudio, in order, start with its Utterance's samples."""

    samples: np.ndarray = field(repr=False)
    turn_start: int  # the turn's first sample on the input timeline (identifies the turn)


@dataclass(frozen=True)
class SpeechPaused:
    """A short pause (with `pause_ms`) in a turn long enough to count: what the turn would be if it ended now."""

    utterance: Utterance


@dataclass(frozen=True)
class SpeechResumed:
    """Speech again after a SpeechPaused, in the same turn."""

    turn_start: int


SegmentEvent = SpeechStarted | Utterance | SpeechDiscarded | TurnAudio | SpeechPaused | SpeechResumed


@dataclass
class SegmenterState:
    """Everything the segmenter remembers between pushes; a fresh one is the reset state."""

    position: int = 0  # samples classified so far (whole frames), on the input timeline
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))  # partial frame
    recent: deque[np.ndarray] = field(default_factory=deque)  # idle: frames kept for pre-roll + onset
    voiced_run: int = 0  # idle: voiced frames in a row
    in_turn: bool = False
    turn: list[np.ndarray] = field(default_factory=list)  # frames of the current turn
    turn_start: int = 0  # sample where the current turn's audio begins
    onset: int = 0  # first voiced sample of the current turn
    last_voiced_end: int = 0  # sample just after the turn's last voiced frame
    silent_run: int = 0  # in a turn: non-voiced frames in a row
    continued: bool = False  # the current turn goes on after a max-length cut
    paused: bool = False  # a SpeechPaused was emitted and no voiced frame came since


class Segmenter:
    """Feed samples with `push`, get events back; `finish` at end of input; `reset` to start over."""

    def __init__(self, config: VadConfig | None = None, classifier: FrameClassifier | None = None, *,
                 stream_turns: bool = False, pause_ms: int | None = None) -> None:
        """`stream_turns`: also emit TurnAudio; `pause_ms`: also emit SpeechPaused / SpeechResumed (at least
        the post-roll, so that a paused turn's utterance is already the one its end of turn would give)."""
        self.config = config or VadConfig()
        self.stream_turns = stream_turns
        self.pause_ms = None if pause_ms is None else max(pause_ms, self.config.post_roll_ms, 1)
        self.classifier = classifier or make_classifier(self.config)
        self.state = SegmenterState()
        self._recent_frames = self.config.frames(self.config.pre_roll_ms) + self.config.start_frames
        self.state.recent = deque(maxlen=self._recent_frames)

    def reset(self, at_sample: int = 0) -> None:
        """Forget everything; the next sample pushed is ``at_sample`` on the timeline."""
        self.state = SegmenterState(position=at_sample, recent=deque(maxlen=self._recent_frames))
        reset = getattr(self.classifier, "reset", None)
        if callable(reset):  # a recurrent classifier (Silero) starts a new stream
            reset()

    @property
    def in_turn(self) -> bool:
        return self.state.in_turn

    def push(self, samples: np.ndarray) -> list[SegmentEvent]:
        """(n,) int16 or float32 mono samples at the config rate, any n -> events, in order."""
        data = _as_float32(samples)
        st, n = self.state, self.config.frame_samples
        if len(st.pending):
            data = np.concatenate([st.pending, data])
        whole = len(data) - len(data) % n
        st.pending = data[whole:].copy()
        events: list[SegmentEvent] = []
        for start in range(0, whole, n):
            events.extend(self._frame(data[start : start + n]))
        return events

    def finish(self) -> list[SegmentEvent]:
        """End of input: close a turn in progress as if its hangover had passed."""
        st = self.state
        st.pending = np.zeros(0, dtype=np.float32)
        if not st.in_turn:
            return []
        return [self._close_turn(truncated=False)]

    def paused_turn(self) -> tuple[int, int] | None:
        """(start, end sample) of the turn's Utterance while it is paused (no speech since its SpeechPaused)."""
        st = self.state
        return (st.turn_start, self._end_now()) if st.in_turn and st.paused else None

    def end_turn(self, turn_start: int, end_sample: int) -> list[SegmentEvent]:
        """End the paused turn whose SpeechPaused carried this utterance (the end-of-turn detector judged it
        complete): its Utterance is that one. Nothing if that pause is over (speech resumed, or the turn ended)."""
        if self.paused_turn() != (turn_start, end_sample):
            return []
        return [self._close_turn(truncated=False)]

    def turn_audio(self) -> np.ndarray:
        """Everything heard of the turn in progress, its pause included (empty outside a turn)."""
        st = self.state
        return np.concatenate(st.turn) if st.in_turn and st.turn else np.zeros(0, dtype=np.float32)

    def _frame(self, frame: np.ndarray) -> list[SegmentEvent]:
        st, cfg = self.state, self.config
        voiced = float(self.classifier(_as_int16(frame))) >= (cfg.release if st.in_turn else cfg.threshold)
        frame_start = st.position
        st.position += len(frame)
        if not st.in_turn:
            return self._idle_frame(frame, frame_start, voiced)
        st.turn.append(frame)
        events: list[SegmentEvent] = [TurnAudio(frame, st.turn_start)] if self.stream_turns else []
        if voiced:
            st.silent_run = 0
            st.last_voiced_end = st.position
            if st.paused:
                st.paused = False
                events.append(SpeechResumed(st.turn_start))
        else:
            st.silent_run += 1
        if st.silent_run >= self.config.frames(self.config.hangover_ms):
            return [*events, self._close_turn(truncated=False)]
        if st.position - st.turn_start >= self.config.samples(self.config.max_turn_s * MS_PER_SECOND):
            return [*events, self._close_turn(truncated=True)]
        if self.pause_ms is not None and not st.paused and st.silent_run >= self.config.frames(self.pause_ms):
            utterance = self._utterance_so_far()
            if utterance is not None:
                st.paused = True
                events.append(SpeechPaused(utterance))
        return events

    def _utterance_so_far(self) -> Utterance | None:
        """The Utterance the turn would end with now, or None if it would be discarded."""
        st, cfg = self.state, self.config
        speech = st.last_voiced_end - st.onset
        if (speech <= 0) if st.continued else (speech < cfg.samples(cfg.min_turn_ms)):
            return None
        end = self._end_now()
        audio = np.concatenate(st.turn) if st.turn else np.zeros(0, dtype=np.float32)
        return Utterance(audio[: end - st.turn_start], st.turn_start, end, False, cfg.sample_rate)

    def _end_now(self) -> int:
        """Where the turn's Utterance would end if the turn ended now: the post-roll after its last voice."""
        st = self.state
        return max(min(st.position, st.last_voiced_end + self.config.samples(self.config.post_roll_ms)), st.turn_start)

    def _idle_frame(self, frame: np.ndarray, frame_start: int, voiced: bool) -> list[SegmentEvent]:
        st, cfg = self.state, self.config
        st.recent.append(frame)
        st.voiced_run = st.voiced_run + 1 if voiced else 0
        if st.voiced_run < cfg.start_frames:
            return []
        onset = st.position - st.voiced_run * cfg.frame_samples
        kept = min(len(st.recent), st.voiced_run + cfg.frames(cfg.pre_roll_ms))
        st.turn = list(st.recent)[-kept:]
        st.turn_start = st.position - kept * cfg.frame_samples
        st.in_turn, st.onset, st.last_voiced_end, st.silent_run = True, onset, st.position, 0
        st.recent.clear()
        st.voiced_run, st.paused = 0, False
        started: list[SegmentEvent] = [SpeechStarted(at_sample=onset, confirmed_at=st.position)]
        if self.stream_turns:
            started.append(TurnAudio(np.concatenate(st.turn), st.turn_start))
        return started

    def _close_turn(self, truncated: bool) -> SegmentEvent:
        """Cut the current turn; a truncated one continues at once in a new turn."""
        st, cfg = self.state, self.config
        start = st.turn_start
        if truncated:
            end = st.position
            samples = np.concatenate(st.turn)[: end - start] if st.turn else np.zeros(0, dtype=np.float32)
            st.turn, st.turn_start, st.onset, st.silent_run, st.continued = [], end, end, 0, True
            st.paused = False
            return Utterance(samples, start, end, True, cfg.sample_rate)
        # the tail of a cut turn is kept however short, unless it holds no speech at all
        utterance, end = self._utterance_so_far(), self._end_now()
        st.in_turn, st.turn, st.silent_run, st.continued, st.paused = False, [], 0, False, False
        return utterance if utterance is not None else SpeechDiscarded(start, end)


def make_classifier(config: VadConfig) -> FrameClassifier:
    """The config's engine as a FrameClassifier (its package imported now: a missing one fails at once)."""
    if config.engine == "silero":
        from glmvoice_cli.audio.silero import SileroClassifier

        return SileroClassifier(config.sample_rate)
    return WebRtcClassifier(config.aggressiveness, config.sample_rate)


class WebRtcClassifier:
    """webrtcvad's GMM voice detector as a FrameClassifier (imported on first use)."""

    def __init__(self, aggressiveness: int = 2, sample_rate: int = SAMPLE_RATE_IN) -> None:
        try:
            import webrtcvad
        except ImportError as e:
            raise GlmVoiceError("webrtcvad is not installed (pip install webrtcvad-wheels)") from e
        self._vad = webrtcvad.Vad(aggressiveness)
        self._rate = sample_rate

    def __call__(self, frame: np.ndarray) -> float:
        return float(self._vad.is_speech(np.ascontiguousarray(frame, dtype=np.int16).tobytes(), self._rate))


def _as_float32(samples: np.ndarray) -> np.ndarray:
    """int16 -> float32 in [-1, 1]; float input is kept as float32; always 1-D."""
    samples = np.asarray(samples).reshape(-1)
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / INT16_SCALE
    return samples.astype(np.float32, copy=False)


def _as_int16(frame: np.ndarray) -> np.ndarray:
    return (np.clip(frame, -1.0, 1.0) * INT16_SCALE).astype(np.int16)
