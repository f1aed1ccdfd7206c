"""The end-of-turn policy (smart detector at the pause) on the virtual clock, and the Smart Turn model itself."""

from __future__ import annotations

import functools
import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from glmvoice_cli.audio.end_of_turn import (
    Decision,
    Judgement,
    JudgeThread,
    SmartTurn,
    TurnEndConfig,
    TurnEndPolicy,
    TurnJudge,
    judge,
    judge_offline,
    smart_turn_features,
    turn_vad,
)
from glmvoice_cli.audio.fakes import RecordingSink
from glmvoice_cli.audio.vad import Segmenter, SpeechPaused, Utterance, VadConfig
from glmvoice_cli.chat.engine import ChatEngine, EngineConfig
from glmvoice_cli.errors import CheckpointError, UsageError
from glmvoice_cli.events import TurnJudged, UserUtterance
from glmvoice_cli.models.settings import turn_model_path
from glmvoice_cli.options import LoadOptions
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.sessions.store import SessionStore
from glmvoice_cli.tiny.modelset import write_tiny_model_set
from glmvoice_cli.ui.view import PlainView

from . import test_turn_taking as turn_taking
from .chat_helpers import OUT_RATE, RATE, burst, energy_vad, silence
from .test_turn_taking import AUDIBLE, PAUSE_MS, VAD, lines, saved

MAX_PAUSE_MS = 1500  # a turn judged unfinished ends after this much silence


class ScriptedJudge:
    """A detector that answers `probability` and remembers what it was shown."""

    def __init__(self, probability: float, fail: bool = False) -> None:
        self.probability, self.fail = probability, fail
        self.calls: list[int] = []

    def __call__(self, samples: np.ndarray) -> float:
        self.calls.append(len(samples))
        if self.fail:
            raise RuntimeError("the detector broke")
        return self.probability


@pytest.fixture(scope="module")
def assistant(tmp_path_factory: pytest.TempPathFactory) -> Assistant:
    models = write_tiny_model_set(tmp_path_factory.mktemp("models"), codebook=64)
    return Assistant.load(models.dirs, LoadOptions(device="cpu", seed=0))


def converse(assistant: Assistant, user: np.ndarray, folder: Path, turn_end: TurnEndConfig,
             judge: TurnJudge | None, **options: Any) -> tuple[ChatEngine, RecordingSink, SessionStore, list[object]]:
    return turn_taking.converse(assistant, user, folder, turn_end=turn_end, turn_judge=judge, **options)


def first_heard_s(sink: RecordingSink) -> float:
    heard = np.flatnonzero(np.abs(sink.recording()) > AUDIBLE)
    assert heard.size, "nothing was played"
    return heard[0] / OUT_RATE


SMART = TurnEndConfig("smart", 0.5, MAX_PAUSE_MS)


def test_a_turn_judged_complete_ends_at_the_pause_and_plays_the_speculative_answer(
        assistant: Assistant, tmp_path: Path) -> None:
    voice_end_s = 1.5
    user = np.concatenate([silence(0.5), burst(1.0), silence(3.0)])
    judge = ScriptedJudge(0.9)
    engine, sink, store, events = converse(assistant, user, tmp_path / "smart", SMART, judge)
    judged = [e for e in events if isinstance(e, TurnJudged)]
    assert len(judged) == 1 and judged[0].ended and judged[0].probability == 0.9
    assert judge.calls and judge.calls[0] >= RATE  # it heard the whole turn so far, pause included
    assert engine.speculation.started == 1 and engine.speculation.confirmed == 1
    assert [r["role"] for r in lines(store)] == ["user", "assistant"]
    early = first_heard_s(sink)
    assert early < voice_end_s + 0.5  # the pause (120 ms) plus the answer's own time, not 1.5 s of silence
    shown = io.StringIO()
    view = PlainView(shown)
    for event in events:
        view.show(event)
    assert "s of speech, judged finished at 0.90)" in shown.getvalue()  # the plain view says why it ended
    from glmvoice_cli.ui.live_view import TranscriptState, _user_line

    state = TranscriptState()
    for event in events:
        state.apply(event)
    (user_turn,) = [t for t in state.turns if t.role == "user"]
    assert "judged finished at 0.90" in _user_line(user_turn).plain  # and so does the live view

    # silence alone waits the full 1.5 s; the same history either way
    plain, plain_sink, plain_store, _ = converse(assistant, user, tmp_path / "plain", TurnEndConfig(), None,
                                                 vad=turn_vad(VAD, SMART), pause_ms=None)
    assert first_heard_s(plain_sink) >= voice_end_s + MAX_PAUSE_MS / 1000
    assert saved(store) == saved(plain_store)
    assert engine.conversation.ids == plain.conversation.ids


def test_a_turn_judged_unfinished_waits_and_nothing_of_the_dropped_answer_leaks(
        assistant: Assistant, tmp_path: Path) -> None:
    # a 600 ms pause mid-sentence: silence at 300 ms would answer the first half; the detector says "not done"
    user = np.concatenate([silence(0.5), burst(1.0), silence(0.6), burst(0.8, f0=180.0), silence(3.0)])
    _, _, split_store, _ = converse(assistant, user, tmp_path / "silence", TurnEndConfig(), None)
    assert [r["role"] for r in lines(split_store)] == ["user", "assistant", "user", "assistant"]

    judge = ScriptedJudge(0.1)
    engine, _, store, events = converse(assistant, user, tmp_path / "smart", SMART, judge)
    judged = [e for e in events if isinstance(e, TurnJudged)]
    assert len(judged) == 2 and not any(e.ended for e in judged)
    out = io.StringIO()
    view = PlainView(out)
    for event in events:
        view.show(event)
    shown = out.getvalue()
    assert "s of speech)" in shown and "judged finished" not in shown  # the silence ended it
    assert engine.speculation.started == 2 and engine.speculation.dropped == 1
    assert engine.speculation.confirmed == 1  # the last pause's answer, once 1.5 s of silence ended the turn
    assert sum(isinstance(e, UserUtterance) for e in events) == 1

    # exactly the session of one long turn answered after the silence, without any speculation
    plain, _, plain_store, _ = converse(assistant, user, tmp_path / "plain", TurnEndConfig(), None,
                                        vad=turn_vad(VAD, SMART), pause_ms=None)
    assert saved(store) == saved(plain_store)
    assert engine.conversation.ids == plain.conversation.ids


def test_the_detector_judges_even_with_speculation_off_and_a_failing_detector_falls_back_to_silence(
        assistant: Assistant, tmp_path: Path) -> None:
    user = np.concatenate([silence(0.5), burst(1.0), silence(3.0)])
    engine, sink, _, events = converse(assistant, user, tmp_path / "nospec", SMART, ScriptedJudge(0.9), pause_ms=None)
    assert engine.speculation.started == 0
    assert [e.ended for e in events if isinstance(e, TurnJudged)] == [True]
    assert first_heard_s(sink) < 1.5 + MAX_PAUSE_MS / 1000

    broken = ScriptedJudge(0.9, fail=True)
    engine, sink, store, events = converse(assistant, user, tmp_path / "broken", SMART, broken)
    assert broken.calls and not any(isinstance(e, TurnJudged) for e in events)
    assert [r["role"] for r in lines(store)] == ["user", "assistant"]  # answered once the silence ended it
    assert first_heard_s(sink) >= 1.5 + MAX_PAUSE_MS / 1000


def test_a_judgement_that_arrives_after_the_person_spoke_again_ends_nothing() -> None:
    segmenter = Segmenter(turn_vad(VAD, SMART), energy_vad, pause_ms=PAUSE_MS)
    policy = TurnEndPolicy(segmenter, SMART)
    events = segmenter.push(np.concatenate([silence(0.5), burst(1.0), silence(0.2)]))
    paused = [e for e in events if isinstance(e, SpeechPaused)]
    assert len(paused) == 1
    request = policy.request(paused[0].utterance)
    assert policy.still_paused(request)
    segmenter.push(burst(0.3))  # the decision was still being computed
    assert policy.decide(request, 0.99) == (False, [])
    segmenter.push(silence(0.2))  # a new pause: the old request still ends nothing
    assert policy.decide(request, 0.99) == (False, [])


def test_a_judgement_on_time_ends_the_turn_with_the_pauses_utterance() -> None:
    segmenter = Segmenter(turn_vad(VAD, SMART), energy_vad, pause_ms=PAUSE_MS)
    policy = TurnEndPolicy(segmenter, SMART)
    events = segmenter.push(np.concatenate([silence(0.5), burst(1.0), silence(0.2)]))
    paused = next(e for e in events if isinstance(e, SpeechPaused))
    assert policy.decide(policy.request(paused.utterance), 0.2) == (False, [])  # below the threshold
    assert policy.decide(policy.request(paused.utterance), float("nan")) == (False, [])  # a broken model: wait
    ended, closing = policy.decide(policy.request(paused.utterance), 0.7)
    assert ended and len(closing) == 1 and isinstance(closing[0], Utterance)
    assert (closing[0].start_sample, closing[0].end_sample) == (paused.utterance.start_sample,
                                                                paused.utterance.end_sample)
    np.testing.assert_array_equal(closing[0].samples, paused.utterance.samples)
    assert not segmenter.in_turn and segmenter.end_turn(paused.utterance.start_sample, paused.utterance.end_sample) == []


def test_the_judge_thread_answers_off_the_callers_thread() -> None:
    results: list[Judgement | Exception] = []
    threads: list[str] = []
    done = threading.Event()

    def collect(result: Judgement | Exception) -> None:
        results.append(result)
        threads.append(threading.current_thread().name)
        if len(results) == 2:
            done.set()

    JudgeThread(ScriptedJudge(0.25)).submit(silence(0.5), collect)
    JudgeThread(ScriptedJudge(0.25, fail=True)).submit(silence(0.5), collect)
    assert done.wait(30)
    probabilities = [r.probability for r in results if isinstance(r, Judgement)]
    assert probabilities == [0.25] and any(isinstance(r, RuntimeError) for r in results)
    assert all(name.startswith("glmvoice-turn") for name in threads)


def test_turn_end_settings_are_checked() -> None:
    for bad in ({"detector": "psychic"}, {"threshold": 0.0}, {"threshold": 1.5}, {"max_pause_ms": 0}):
        with pytest.raises(UsageError):
            TurnEndConfig(**bad)  # type: ignore[arg-type]
    from glmvoice_cli.chat.settings import check_turn_end

    with pytest.raises(UsageError, match="models download turn"):  # the core refuses smart without a detector
        check_turn_end(SMART, None)


# ---------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def model_file() -> Path:
    path = turn_model_path()
    assert path is not None, "the Smart Turn model ships in the pipecat-ai wheel (a dev dependency)"
    return path


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """Voiced bursts with a falling pitch and pauses: audio with structure, not just noise."""
    rng = np.random.default_rng(seed)
    parts = [silence(0.3)]
    while sum(map(len, parts)) < seconds * RATE:
        parts += [burst(rng.uniform(0.15, 0.4), f0=rng.uniform(100, 220)), silence(rng.uniform(0.02, 0.2))]
    audio = np.concatenate(parts)[: int(seconds * RATE)]
    return (audio + 0.003 * rng.standard_normal(len(audio))).astype(np.float32)


@pytest.mark.parametrize("seconds", [1.3, 8.0, 11.0])
def test_our_features_are_whispers_at_8_s(seconds: float) -> None:
    from transformers import WhisperFeatureExtractor

    audio = speechlike(seconds, seed=int(seconds * 10))
    window = np.pad(audio, (max(0, 8 * RATE - len(audio)), 0))[-8 * RATE :]  # the model's last 8 s, silence in front
    reference = WhisperFeatureExtractor(chunk_length=8, feature_size=80)(
        window, sampling_rate=RATE, return_tensors="np", do_normalize=True, padding="max_length",
        max_length=8 * RATE, truncation=True).input_features[0]
    ours = smart_turn_features(audio)
    assert ours.shape == reference.shape == (80, 800)
    np.testing.assert_allclose(ours, reference, atol=2e-4)


def test_the_model_gives_pipecats_own_probability(model_file: Path) -> None:
    from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3

    theirs = LocalSmartTurnAnalyzerV3(smart_turn_model_path=str(model_file))
    ours = SmartTurn(model_file)
    for seed, seconds in ((1, 1.2), (2, 4.0), (3, 9.5)):
        audio = speechlike(seconds, seed)
        expected = theirs._predict_endpoint(audio)["probability"]
        assert 0.0 <= ours(audio) <= 1.0
        assert abs(ours(audio) - expected) < 1e-3, (seed, ours(audio), expected)


def test_the_model_judges_every_pause_of_a_turn_offline(model_file: Path) -> None:
    detector = SmartTurn(model_file)
    user = np.concatenate([silence(0.5), speechlike(1.5, 4), silence(0.4), speechlike(1.0, 5), silence(2.0)])
    segmenter = Segmenter(turn_vad(VAD, SMART), energy_vad, pause_ms=PAUSE_MS)
    pushed = list(judge_offline(segmenter, SMART, functools.partial(judge, detector), user))
    events = [e for _, e in pushed if not isinstance(e, Decision)]
    decisions = [(e.request, e.judgement) for _, e in pushed if isinstance(e, Decision)]
    assert [at for at, _ in pushed] == sorted(at for at, _ in pushed)  # in input order
    assert decisions and all(0.0 <= j.probability <= 1.0 and j.seconds > 0 for _, j in decisions)
    assert [r.at_sample for r, _ in decisions] == sorted(r.at_sample for r, _ in decisions)
    assert any(isinstance(e, Utterance) for e in events)


def test_a_broken_model_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "smart-turn.onnx"
    bad.write_bytes(b"not an onnx model" * 100)
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        SmartTurn(bad)
    with pytest.raises(CheckpointError, match="no Smart Turn model"):
        SmartTurn(tmp_path / "missing.onnx")


def test_silero_vad_and_the_real_detector_in_a_scripted_chat(assistant: Assistant, model_file: Path,
                                                             tmp_path: Path) -> None:
    import shutil
    import subprocess

    import soundfile as sf
    import soxr

    from glmvoice_cli.audio.silero import SileroClassifier

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    spoken = []
    for i, text in enumerate(("What is the weather like today?", "Tell me a joke please.")):
        subprocess.run(["espeak-ng", "-w", str(tmp_path / f"{i}.wav"), text], check=True, timeout=60)
        audio, rate = sf.read(tmp_path / f"{i}.wav", dtype="float32")
        spoken.append(soxr.resample(audio, rate, RATE).astype(np.float32))
    user = np.concatenate([silence(0.5), spoken[0], silence(2.5), spoken[1], silence(3.0)])
    vad = VadConfig(engine="silero", hangover_ms=300, pre_roll_ms=96, post_roll_ms=64, min_turn_ms=150)
    judge = SmartTurn(model_file)
    engine, _, store, events = converse(assistant, user, tmp_path / "s", SMART, judge, vad=vad, classifier=None)
    assert isinstance(engine.core.segmenter.classifier, SileroClassifier)  # type: ignore[union-attr]
    assert engine.core.segmenter.config.frame_ms == 32  # type: ignore[union-attr]
    judged = [e for e in events if isinstance(e, TurnJudged)]
    assert len(judged) >= 2 and all(0.0 <= e.probability <= 1.0 for e in judged)
    assert [r["role"] for r in lines(store)] == ["user", "assistant", "user", "assistant"]


def test_the_chat_flags_map_to_the_vad_and_the_policy() -> None:
    from glmvoice_cli.chat.local import TurnTaking

    turns = TurnTaking(vad_engine="silero", min_interruption_ms=100, end_silence_ms=20, turn_detector="smart",
                       end_of_turn_threshold=0.8, max_pause_ms=900, vad_threshold=0.7)
    vad = turns.vad()
    assert (vad.engine, vad.frame_ms, vad.start_frames, vad.hangover_ms) == ("silero", 32, 4, 32)
    assert (vad.threshold, vad.release) == (0.7, pytest.approx(0.55))
    assert TurnTaking(vad_threshold=0.1).vad().release == pytest.approx(0.05)  # never below half the threshold
    assert turns.turn_end() == TurnEndConfig("smart", 0.8, 900)
    assert turn_vad(vad, turns.turn_end()).hangover_ms == 900 and turn_vad(vad, TurnEndConfig()) is vad
    assert TurnTaking().vad().frame_ms == 30 and TurnTaking().turn_end() == TurnEndConfig()
    for bad in ({"engine": "silero", "frame_ms": 30}, {"engine": "webrtc", "frame_ms": 32}, {"engine": "psychic"},
                {"threshold": 0.3, "release": 0.5}, {"engine": "silero", "sample_rate": 48_000}):
        with pytest.raises(UsageError):
            VadConfig(**bad)  # type: ignore[arg-type]


def test_doctor_says_whether_the_smart_detector_can_run(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmvoice_cli.commands import doctor
    from glmvoice_cli.models import settings

    found = doctor.check_turn_detector()
    assert found.status == doctor.OK and str(model_file) in found.detail
    monkeypatch.setattr(settings, "turn_model_path", lambda models=None: None)
    missing = doctor.check_turn_detector()
    assert missing.status == doctor.WARN and "its model" in missing.detail
    assert "models download turn" in missing.fix


def test_typed_turns_need_no_detector_whatever_the_setting(assistant: Assistant) -> None:
    engine = ChatEngine(assistant, None, RecordingSink(sample_rate=OUT_RATE), config=EngineConfig(turn_end=SMART))
    assert engine.core.segmenter is None  # built, not refused: a --text chat with turn_detector = smart set


def test_a_broken_model_turns_semantic_vad_off_in_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    import logging

    from glmvoice_cli.commands.common import load_turn_judge
    from glmvoice_cli.models import settings

    bad = tmp_path / "smart-turn-v3.2-cpu.onnx"
    bad.write_bytes(b"\x00" * 64)
    monkeypatch.setattr(settings, "turn_model_path", lambda models=None: bad)
    logger, records = logging.getLogger("glmvoice_cli"), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]  # whatever a CLI test set up before us
    monkeypatch.setattr(logger, "level", logging.WARNING)
    logger.addHandler(handler)
    try:
        assert load_turn_judge(required=False) is None  # serve goes on with server_vad
    finally:
        logger.removeHandler(handler)
    (record,) = records
    assert record.exc_info is None and "\n" not in record.getMessage()  # one line, no traceback
    assert record.getMessage().startswith(f"semantic_vad is off: {bad}: not a readable ONNX model")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_turn_judge(required=True)  # chat --turn-detector smart: the one-line error
