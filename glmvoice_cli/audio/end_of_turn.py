"""Has the person finished? Smart Turn v3 judges it from the audio of the turn so far.

Smart Turn v3 (pipecat-ai/smart-turn-v3 on the Hugging Face hub, BSD-2; the same file ships inside the
`pipecat-ai` wheel) is a Whisper-tiny encoder with a classifier head, exported to ONNX. It reads the last
8 s of a turn's 16 kHz audio as 80 Whisper log-mel bins (the turn left-padded with silence to 8 s) and
returns the probability that the turn is complete. Our features are computed here in numpy, the way its
published preprocessing (`WhisperFeatureExtractor(chunk_length=8)`, `do_normalize=True`) computes them;
the tests hold the two together.

`TurnJudge` is what the conversation core asks at a short pause; `SmartTurn` is the model behind it, loaded
once per process and shared by every conversation (an onnxruntime session may be run from several threads).
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from glmvoice_cli.audio.vad import Segmenter, SegmentEvent, SpeechPaused, Utterance, VadConfig
from glmvoice_cli.config import SAMPLE_RATE_IN
from glmvoice_cli.errors import CheckpointError, GlmVoiceError, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

SMART_TURN_FILE = "smart-turn-v3.2-cpu.onnx"  # the int8 CPU export: 8.7 MB, as fast as the fp32 one on a CPU
SMART_TURN_SECONDS = 8  # the model reads the last 8 s of the turn
N_FFT = 400  # samples (25 ms)
HOP = 160  # samples (10 ms)
N_MELS = 80  # Whisper-tiny's mel bins
LOG_FLOOR = 1e-10  # power floor before log10
DYNAMIC_RANGE = 8.0  # decades kept below the window's maximum
NORM_EPS = 1e-7  # variance floor of the waveform normalisation
MAX_MODEL_BYTES = 256 << 20  # a Smart Turn export is 8-33 MB; a bigger file was named by mistake
DETECTORS = ("silence", "smart")
DEFAULT_THRESHOLD = 0.5  # the model's own decision boundary


@dataclass(frozen=True)
class TurnEndConfig:
    """How the end of a spoken turn is decided.

    `silence`: the turn ends after the VAD's `hangover_ms` of silence (`--end-silence-ms`). `smart`: at a
    short pause (the speculative pause) the detector judges the turn; at `threshold` or above it ends at
    once, below it the turn waits up to `max_pause_ms` of silence, longer than the silence-only wait, so a
    pause mid-sentence gets more time, not less.
    """

    detector: str = "silence"
    threshold: float = DEFAULT_THRESHOLD  # probability of "complete" that ends the turn
    max_pause_ms: int = 1500  # smart: the silence that ends a turn judged unfinished

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise UsageError(f"turn detector must be one of {', '.join(DETECTORS)}, not {self.detector!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise UsageError(f"end-of-turn threshold must be above 0 and at most 1, not {self.threshold}")
        if self.max_pause_ms <= 0:
            raise UsageError(f"the longest pause must be positive, not {self.max_pause_ms} ms")

    @property
    def smart(self) -> bool:
        return self.detector == "smart"


@dataclass(frozen=True)
class Judgement:
    """One decision: the probability that the turn is complete, and what it cost."""

    probability: float
    seconds: float  # wall time of the decision (features + model)
    cpu_seconds: float = 0.0  # CPU time of the deciding thread (onnxruntime runs one thread, on it)


class TurnJudge(Protocol):
    """Probability that a turn whose 16 kHz audio so far is `samples` (float32) is complete."""

    def __call__(self, samples: np.ndarray) -> float: ...


@functools.cache
def _mel_filters() -> np.ndarray:
    """(n_fft // 2 + 1, 80) Slaney filters, float64: transformers' own, as Whisper's extractor uses."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=N_MELS, min_frequency=0.0,
                           max_frequency=SAMPLE_RATE_IN / 2, sampling_rate=SAMPLE_RATE_IN,
                           norm="slaney", mel_scale="slaney")


def last_seconds(samples: np.ndarray, seconds: int = SMART_TURN_SECONDS) -> np.ndarray:
    """The last `seconds` of `samples`, silence added in front of a shorter turn."""
    n = seconds * SAMPLE_RATE_IN
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)[-n:]
    return np.pad(samples, (n - len(samples), 0)) if len(samples) < n else samples


def smart_turn_features(samples: np.ndarray) -> np.ndarray:
    """16 kHz float audio of any length -> (80, 800) float32 log-mel of its last 8 s.

    The waveform is normalised to zero mean and unit variance (in float32, over the padded window), then a
    centred, reflect-padded STFT with a periodic Hann window; the last frame is dropped, as Whisper does.
    """
    x = last_seconds(samples)
    x = (x - x.mean()) / np.sqrt(x.var() + NORM_EPS)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]  # (801, 400)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (801, 201)
    mel = np.maximum(power[:-1] @ _mel_filters(), LOG_FLOOR).T  # (80, 800)
    log = np.log10(mel)
    log = np.maximum(log, log.max() - DYNAMIC_RANGE)
    return ((log + 4.0) / 4.0).astype(np.float32)


class SmartTurn:
    """The Smart Turn v3 ONNX model: `__call__(samples)` -> probability that the turn is complete."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise GlmVoiceError("the smart turn detector needs onnxruntime (pip install 'glmvoice[turn]')") from e
        if not path.is_file():
            raise CheckpointError(f"{path}: no Smart Turn model file there")
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes is not a Smart Turn model")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # a decision is ~40 ms of one core; more threads would take cores from the model
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # onnxruntime's warnings about unused initializers are not the user's
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable ONNX model ({type(e).__name__})") from e
        inputs = {i.name: i.shape for i in self._session.get_inputs()}
        if list(inputs) != ["input_features"] or list(inputs["input_features"])[1:] != [N_MELS, 100 * SMART_TURN_SECONDS]:
            raise CheckpointError(f"{path}: expected one input 'input_features' of (batch, 80, 800), found {inputs}")
        self.path = path

    def __call__(self, samples: np.ndarray) -> float:
        features = smart_turn_features(samples)[None]
        (output,) = self._session.run(None, {"input_features": features})[:1]
        return float(np.asarray(output).reshape(-1)[0])


def judge(detector: TurnJudge, samples: np.ndarray) -> Judgement:
    """Time one decision."""
    start, cpu = time.perf_counter(), time.thread_time()
    probability = detector(samples)
    return Judgement(probability, time.perf_counter() - start, time.thread_time() - cpu)


class JudgeThread:
    """Runs decisions one at a time off the capture and model threads; `submit` returns at once and the
    callback runs on this thread with the Judgement (or the exception the detector raised)."""

    def __init__(self, detector: TurnJudge) -> None:
        self.detector = detector
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # started at the first decision

    def submit(self, samples: np.ndarray, done: Callable[[Judgement | Exception], None]) -> None:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmvoice-turn")
            executor = self._executor
        executor.submit(self._run, samples, done)

    def decide(self, samples: np.ndarray) -> Judgement | Exception:
        """One decision here and now (a virtual clock's reproducible runs, and this thread's work)."""
        try:
            return judge(self.detector, samples)
        except Exception as e:  # noqa: BLE001 - handed to the caller, who ends the turn on silence instead
            return e

    def _run(self, samples: np.ndarray, done: Callable[[Judgement | Exception], None]) -> None:
        done(self.decide(samples))


@dataclass(frozen=True)
class PauseRequest:
    """A pause to judge: which turn, where its utterance would end, and everything heard of it."""

    turn_start: int
    end_sample: int
    at_sample: int  # input position when the pause was reached
    samples: np.ndarray


class TurnEndPolicy:
    """Between the segmenter and the conversation: at each pause, ask the detector; a complete turn ends there.

    The segmenter (with `hangover_ms` = `max_pause_ms`) ends a turn on silence as before; this only ends one
    sooner. `request` is called at a SpeechPaused, `decide` with its Judgement (at once, or later from the
    judge thread, under the caller's input lock): it returns the events that end the turn, or nothing if the
    probability is below the threshold or the person spoke again meanwhile (the pause was then not the end).
    """

    def __init__(self, segmenter: Segmenter, config: TurnEndConfig) -> None:
        self.segmenter, self.config = segmenter, config

    def request(self, utterance: Utterance) -> PauseRequest:
        st = self.segmenter.state
        return PauseRequest(utterance.start_sample, utterance.end_sample, st.position, self.segmenter.turn_audio())

    def still_paused(self, request: PauseRequest) -> bool:
        """No speech since the pause was judged, in the same turn."""
        return self.segmenter.paused_turn() == (request.turn_start, request.end_sample)

    def decide(self, request: PauseRequest, probability: float) -> tuple[bool, list[SegmentEvent]]:
        """(the turn ended, the segmenter's events that end it)."""
        if not probability >= self.config.threshold:  # NaN too: a broken model leaves the turn to the silence
            return False, []
        events = self.segmenter.end_turn(request.turn_start, request.end_sample)
        return bool(events), events


@dataclass(frozen=True)
class Decision:
    """One pause judged offline, and whether it ended the turn."""

    request: PauseRequest
    judgement: Judgement
    ended: bool


def judge_offline(segmenter: Segmenter, config: TurnEndConfig, judging: Callable[[np.ndarray], Judgement] | None,
                  samples: np.ndarray) -> Iterator[tuple[int, SegmentEvent | Decision]]:
    """Offline (benchmarks, tests): push `samples` frame by frame as a microphone would and judge each pause at
    once with `judging` (e.g. `functools.partial(judge, detector)`; None: silence only). Yields (the input
    position when it happened, the segmenter's event or the Decision), the early ends in place. The turn still
    open at the end is left open (call `segmenter.finish()` for it)."""
    policy = TurnEndPolicy(segmenter, config)
    frame = segmenter.config.frame_samples
    for start in range(0, len(samples) - frame + 1, frame):
        for event in segmenter.push(samples[start : start + frame]):
            yield segmenter.state.position, event
            if isinstance(event, SpeechPaused) and judging is not None and config.smart:
                request = policy.request(event.utterance)
                judgement = judging(request.samples)
                ended, closing = policy.decide(request, judgement.probability)
                yield request.at_sample, Decision(request, judgement, ended)
                for closed in closing:
                    yield segmenter.state.position, closed


def turn_vad(vad: VadConfig, config: TurnEndConfig) -> VadConfig:
    """The segmenter's config under `config`: with the smart detector, silence ends a turn only after
    `max_pause_ms` (the detector ends complete turns sooner)."""
    if not config.smart:
        return vad
    return replace(vad, hangover_ms=max(config.max_pause_ms, vad.frame_ms))
