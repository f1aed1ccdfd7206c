"""The chat engine on the fakes and a virtual clock: turns, barge-in with history trim, echo, typing,
resume, Ctrl-C and lost devices. Tiny random models, capped answers, synthetic speech."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from glmvoice_cli.audio.fakes import ArraySource, NullSink
from glmvoice_cli.audio.playback import VirtualClock
from glmvoice_cli.chat.engine import ChatEngine, EngineConfig
from glmvoice_cli.errors import AudioDeviceError
from glmvoice_cli.events import AudioChunk, Failed, Interrupted, TextDelta, TurnEnded, UserUtterance
from glmvoice_cli.lm.voice_lm import GenerationOptions
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.pipeline.history import audio_tokens_heard, restore_conversation
from glmvoice_cli.sessions.store import SessionStore, load_session

from .chat_helpers import OUT_RATE, RATE, burst, make_rig, run_rig, silence

BARGE_IN_LIMIT_S = 0.2  # the answer must stop within this of the user's speech onset
AUDIBLE = 1e-4  # output samples above this count as sound


def _lines(store: SessionStore) -> list[dict]:
    return [json.loads(line) for line in store.transcript_path.read_text().splitlines()]


def _history(lines: list[dict]) -> list[int]:
    return [i for line in lines for i in line["token_ids"]]


def test_two_spoken_turns_are_answered_and_saved(assistant: Assistant, tmp_path: Path) -> None:
    user = np.concatenate([silence(0.5), burst(1.0), silence(4.0), burst(1.0), silence(4.0)])
    rig = make_rig(assistant, user, tmp_path=tmp_path)
    events = run_rig(rig)
    assert rig.engine.error is None
    assert [r.interrupted for r in rig.engine.reports] == [False, False]
    lines = _lines(rig.store)
    assert [line["role"] for line in lines] == ["user", "assistant", "user", "assistant"]
    for line in lines:
        assert (rig.store.path / line["audio"]).is_file()
        assert line["token_ids"] and line["interrupted"] is False
    assert set(lines[1]["timings"]) >= {"first_token_s", "first_audio_s", "real_time_factor", "tokens"}
    assert _history(lines) == rig.engine.conversation.ids  # the saved ids are exactly the history
    ended = [e for e in events if isinstance(e, TurnEnded)]
    assert len(ended) == 2 and not any(e.interrupted for e in ended)
    # each answer starts playing after its question ended, on the recorded timeline
    heard = np.flatnonzero(np.abs(rig.sink.recording()) > AUDIBLE) / OUT_RATE
    for report in rig.engine.reports:
        start = report.utterance_end / RATE
        assert np.any((heard >= start) & (heard < start + 1.0))


def test_barge_in_cuts_the_answer_and_trims_the_history(assistant: Assistant, tmp_path: Path) -> None:
    first = np.concatenate([silence(0.5), burst(1.0)])
    # the answer starts ~0.3 s (hangover) after the burst; the user cuts in 0.6 s into it
    user = np.concatenate([first, silence(0.9), burst(0.8), silence(4.0)])
    onset = (len(first) + int(0.9 * RATE)) / RATE
    rig = make_rig(assistant, user, tmp_path=tmp_path, max_new_tokens=60)
    events = run_rig(rig)
    cut, second = rig.engine.reports
    assert cut.interrupted and not second.interrupted
    assert cut.barge_in_at is not None and abs(cut.barge_in_at / RATE - onset) < 0.05
    assert any(isinstance(e, Interrupted) for e in events)
    # on the output timeline, nothing of the first answer plays 200 ms after the onset
    recording = rig.sink.recording(0, int(second.utterance_end / RATE * OUT_RATE))
    heard = np.flatnonzero(np.abs(recording) > AUDIBLE)
    assert heard.size and heard[-1] / OUT_RATE <= onset + BARGE_IN_LIMIT_S
    # the history keeps the answer up to the last audio token played, no further
    tok = assistant.lm.text_tokenizer
    kept_audio = sum(tok.is_audio(i) for i in cut.kept_ids)
    assert 0 < kept_audio == audio_tokens_heard(cut.played_samples, OUT_RATE)
    assert len(cut.kept_ids) < cut.generated_tokens
    assert tok.is_audio(cut.kept_ids[-1])
    lines = _lines(rig.store)
    assert [line["interrupted"] for line in lines if line["role"] == "assistant"] == [True, False]
    assert tuple(lines[1]["token_ids"]) == cut.kept_ids
    assert lines[1]["duration_s"] == pytest.approx(cut.played_samples / OUT_RATE, abs=1e-3)
    assert _history(lines) == rig.engine.conversation.ids


@pytest.mark.parametrize("echo_mode", ["off", "auto"])
def test_own_voice_echo_interrupts_only_without_the_canceller(assistant: Assistant, echo_mode: str) -> None:
    """The speaker's output comes back into the microphone at gain 0.6 after 30 ms."""
    user = np.concatenate([silence(0.5), burst(1.0), silence(5.0)])
    rig = make_rig(assistant, user, tmp_path=None, max_new_tokens=60, echo_mode=echo_mode, echo_gain=0.6)
    run_rig(rig)
    first = rig.engine.reports[0]
    if echo_mode == "off":
        assert first.interrupted, "the simulated echo must be loud enough to trigger barge-in"
    else:
        assert not first.interrupted and len(rig.engine.reports) == 1


def _typed_engine(assistant: Assistant, store: SessionStore | None, sink=None, max_new_tokens: int = 30,  # type: ignore[no-untyped-def]
                  conversation=None) -> ChatEngine:  # type: ignore[no-untyped-def]
    config = EngineConfig(generation=GenerationOptions(max_new_tokens=max_new_tokens, seed=1))
    return ChatEngine(assistant, None, sink or NullSink(), store=store, config=config, conversation=conversation)


def test_a_typed_turn_is_answered_in_speech(assistant: Assistant, tmp_path: Path) -> None:
    store = SessionStore.create(session_dir=tmp_path / "s")
    engine = _typed_engine(assistant, store)
    engine.type_text("Hello, how are you?")
    engine.end_input()
    engine.run()
    lines = _lines(store)
    assert [line["role"] for line in lines] == ["user", "assistant"]
    assert lines[0]["text"] == "Hello, how are you?" and lines[0]["audio"] is None
    assert lines[1]["audio"] is not None and not lines[1]["interrupted"]


def test_resume_continues_the_saved_history(assistant: Assistant, tmp_path: Path) -> None:
    store = SessionStore.create(session_dir=tmp_path / "s")
    engine = _typed_engine(assistant, store)
    engine.type_text("First question.")
    engine.end_input()
    engine.run()
    before = list(engine.conversation.ids)
    resumed = SessionStore.resume(tmp_path / "s")
    conv = restore_conversation(assistant.lm, resumed.turns)
    assert conv.ids == before and conv.system_mode is not None
    engine = _typed_engine(assistant, resumed, conversation=conv)
    engine.type_text("Second question.")
    engine.end_input()
    engine.run()
    lines = _lines(resumed)
    assert [line["role"] for line in lines] == ["user", "assistant"] * 2
    assert lines[2]["token_ids"][0] == assistant.lm.text_tokenizer.token_id("<|user|>")  # no second system prompt
    assert _history(lines) == engine.conversation.ids
    assert len(load_session(tmp_path / "s").turns) == 4


def test_stop_mid_answer_saves_the_turn_as_cut(assistant: Assistant, tmp_path: Path) -> None:
    """What Ctrl-C does: stop() while the answer streams."""
    store = SessionStore.create(session_dir=tmp_path / "s")
    engine = _typed_engine(assistant, store, max_new_tokens=400)
    engine.type_text("Tell me a long story.")
    engine.end_input()
    engine.start()
    seen = 0
    while (event := engine.events.get(timeout=60)) is not None:
        if isinstance(event, (TextDelta, AudioChunk)):
            seen += 1
            if seen == 3:
                engine.stop()
    engine.join()
    lines = _lines(store)
    assert [line["role"] for line in lines] == ["user", "assistant"]
    assert lines[1]["interrupted"] is True
    assert len(lines[1]["token_ids"]) < 400


class _LosingSource(ArraySource):
    """A microphone unplugged after `blocks` reads."""

    def __init__(self, samples: np.ndarray, clock: VirtualClock, blocks: int) -> None:
        super().__init__(samples, RATE, clock=clock)
        self.left = blocks

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        self.left -= 1
        if self.left < 0:
            raise AudioDeviceError("microphone 'fake' stopped delivering audio (unplugged?)")
        return super().read(timeout)


def test_a_microphone_lost_mid_answer_ends_with_the_session_intact(assistant: Assistant, tmp_path: Path) -> None:
    user = np.concatenate([silence(0.5), burst(1.0), silence(5.0)])
    rig = make_rig(assistant, user, tmp_path=tmp_path, max_new_tokens=60)
    clock = rig.sink.clock
    rig.engine.source = _LosingSource(user, clock, blocks=int(2.2 * RATE / 480))  # ~0.4 s into the answer
    events = run_rig(rig)
    assert isinstance(rig.engine.error, AudioDeviceError)
    assert any(isinstance(e, Failed) and "unplugged" in e.message for e in events)
    lines = _lines(rig.store)
    assert [line["role"] for line in lines] == ["user", "assistant"]
    assert lines[1]["interrupted"] is True


class _LosingSink(NullSink):
    def write(self, block: np.ndarray) -> None:
        raise AudioDeviceError("speaker 'fake' stopped playing (unplugged?)")


def test_a_speaker_lost_mid_answer_ends_with_the_session_intact(assistant: Assistant, tmp_path: Path) -> None:
    store = SessionStore.create(session_dir=tmp_path / "s")
    engine = _typed_engine(assistant, store, sink=_LosingSink(), max_new_tokens=60)
    engine.type_text("Hi.")
    engine.type_text("Never answered.")
    engine.end_input()
    engine.start()
    assert engine.wait(120)
    engine.join()
    assert isinstance(engine.error, AudioDeviceError)
    lines = _lines(store)
    assert [line["role"] for line in lines] == ["user", "assistant"]
    assert lines[1]["interrupted"] is True


def test_transcribe_user_fills_the_user_text(assistant: Assistant, tmp_path: Path) -> None:
    from dataclasses import replace

    user = np.concatenate([silence(0.5), burst(1.0), silence(3.0)])
    rig = make_rig(assistant, user, tmp_path=tmp_path, max_new_tokens=20)
    rig.engine.config = replace(rig.engine.config, transcribe_user=True, transcribe_max_new_tokens=8)
    events = run_rig(rig)
    said = [e for e in events if isinstance(e, UserUtterance)]
    lines = _lines(rig.store)
    assert lines[0]["role"] == "user" and lines[0]["audio"] is not None
    assert said[0].text == lines[0]["text"] and said[0].text  # the random model always says something here
    assert lines[0]["token_ids"][0] == assistant.lm.text_tokenizer.prefix_ids[0]  # the transcript left no trace in the history


class _StuckSink(NullSink):
    """A speaker whose stream stopped: written audio is never played."""

    def __init__(self) -> None:
        super().__init__()
        self.queued = 0

    def write(self, block: np.ndarray) -> None:
        self.queued += len(block)

    def flush(self) -> int:
        dropped, self.queued = self.queued, 0
        return dropped

    @property
    def pending(self) -> int:
        return self.queued


def test_a_speaker_that_stops_playing_is_a_lost_device(assistant: Assistant, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import glmvoice_cli.chat.answer as session_mod

    monkeypatch.setattr(session_mod, "PLAYBACK_STALL_S", 0.2)
    store = SessionStore.create(session_dir=tmp_path / "s")
    engine = _typed_engine(assistant, store, sink=_StuckSink())
    engine.type_text("Hi.")
    engine.end_input()
    engine.run()
    assert isinstance(engine.error, AudioDeviceError) and "stopped playing" in str(engine.error)
    lines = _lines(store)
    assert [line["role"] for line in lines] == ["user", "assistant"] and lines[1]["interrupted"]


def test_barge_in_while_generating_stops_the_model_within_a_token(assistant: Assistant, tmp_path: Path) -> None:
    """Without lockstep the virtual clock runs ahead of the model: the user's second burst arrives before
    the first answer is done generating, so the turn's cancel Event must stop the LM early."""
    from dataclasses import replace

    user = np.concatenate([silence(0.5), burst(1.0), silence(0.5), burst(0.8), silence(1.0)])
    rig = make_rig(assistant, user, tmp_path=tmp_path, max_new_tokens=1500)
    rig.engine.config = replace(rig.engine.config, lockstep=False,
                                generation=GenerationOptions(max_new_tokens=1500, seed=1))
    rig.engine.start()
    while not rig.engine.reports and not rig.engine.wait(0.01):
        pass
    rig.engine.stop()  # the second answer is not needed
    rig.engine.join()
    rig.sink.close()
    first = rig.engine.reports[0]
    assert first.interrupted and first.barge_in_at is not None and rig.engine.error is None
    assert first.generated_tokens < 1500
    lines = _lines(rig.store)
    assert [line["role"] for line in lines][:2] == ["user", "assistant"] and lines[1]["interrupted"]
    assert _history(lines) == rig.engine.conversation.ids


def _type_during_the_answer(assistant: Assistant, store: SessionStore, interrupt: bool,
                            max_new_tokens: int) -> list[object]:
    """A first typed question; once its answer streams, a second line (as Enter at the keyboard sends it)."""
    engine = _typed_engine(assistant, store, max_new_tokens=max_new_tokens)
    engine.type_text("Tell me a long story.")
    engine.start()
    events: list[object] = []
    streamed = 0
    while (event := engine.events.get(timeout=60)) is not None:
        events.append(event)
        if isinstance(event, (TextDelta, AudioChunk)):
            streamed += 1
            if streamed == 3:
                engine.type_text("Stop, another question.", interrupt=interrupt)
                engine.end_input()
    engine.join()
    return events


def test_enter_on_a_typed_line_cuts_the_answer_as_speech_does(assistant: Assistant, tmp_path: Path) -> None:
    from glmvoice_cli.events import TypedQueued

    store = SessionStore.create(session_dir=tmp_path / "s")
    events = _type_during_the_answer(assistant, store, interrupt=True, max_new_tokens=400)
    assert any(isinstance(e, Interrupted) and e.turn == 1 for e in events)
    queued = next(i for i, e in enumerate(events) if isinstance(e, TypedQueued))
    taken = next(i for i, e in enumerate(events) if isinstance(e, UserUtterance) and e.turn == 2)
    assert queued < taken and events[queued].text == "Stop, another question."  # type: ignore[attr-defined]
    lines = _lines(store)
    assert [(line["role"], line["interrupted"]) for line in lines] == [
        ("user", False), ("assistant", True), ("user", False), ("assistant", False)]
    assert len(lines[1]["token_ids"]) < 400 and lines[2]["text"] == "Stop, another question."


def test_a_typed_line_without_interrupting_waits_and_is_shown_waiting(assistant: Assistant, tmp_path: Path) -> None:
    from glmvoice_cli.events import TypedQueued
    from glmvoice_cli.ui.live_view import TranscriptState, render

    store = SessionStore.create(session_dir=tmp_path / "s")
    events = _type_during_the_answer(assistant, store, interrupt=False, max_new_tokens=60)
    assert not any(isinstance(e, Interrupted) for e in events)
    assert [line["interrupted"] for line in _lines(store)] == [False, False, False, False]

    from rich.console import Console

    state, console = TranscriptState(), Console(width=100, record=True, file=io.StringIO())
    for event in events:
        state.apply(event)  # type: ignore[arg-type]
        if isinstance(event, TypedQueued):
            console.print(render(state))
            assert "(typed, waits for the answer) Stop, another question." in console.export_text()
    assert state.queued == []  # taken by the model: shown as a turn, no longer as waiting
    assert sum(isinstance(e, TypedQueued) for e in events) == 1
