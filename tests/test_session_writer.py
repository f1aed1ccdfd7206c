"""The session is saved by the writer thread from the engine's events: the model thread never touches the
disk between the end of the user's turn and the first audio block, and nothing said is lost on a failure."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from glmvoice_cli.audio.fakes import NullSink
from glmvoice_cli.chat.engine import ChatEngine, EngineConfig
from glmvoice_cli.errors import GlmVoiceError
from glmvoice_cli.events import AssistantTurn, AudioChunk, TurnTimings, UserAudio, UserUtterance
from glmvoice_cli.lm.voice_lm import GenerationOptions
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.sessions.store import AudioFile, SessionError, SessionStore
from glmvoice_cli.sessions.writer import SessionWriter

from .chat_helpers import RATE, burst, make_rig, run_rig, silence

MODEL_THREAD = "glmvoice-model"


class _TimedStore(SessionStore):
    """Records the thread and time of every audio file and transcript line it writes."""

    writes: list[tuple[str, float, str]]

    def save_audio(self, role: str, samples: np.ndarray | None, sample_rate: int,
                   name: str | None = None) -> AudioFile | None:
        saved = super().save_audio(role, samples, sample_rate, name)
        self.writes.append((threading.current_thread().name, time.perf_counter(), f"{role} audio"))
        return saved

    def _append(self, role: str, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        record = super()._append(role, *args, **kwargs)  # type: ignore[arg-type]
        self.writes.append((threading.current_thread().name, time.perf_counter(), f"{role} line"))
        return record


def _timed_store(path: Path) -> _TimedStore:
    store = _TimedStore(SessionStore.create(session_dir=path).path)
    store.writes = []
    return store


def _lines(store: SessionStore) -> list[dict]:
    return [json.loads(line) for line in store.transcript_path.read_text().splitlines()]


def test_no_disk_write_on_the_model_thread_between_end_of_turn_and_first_audio(
        assistant: Assistant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = np.concatenate([silence(0.5), burst(1.0), silence(4.0), burst(1.0), silence(4.0)])
    store = _timed_store(tmp_path / "s")
    rig = make_rig(assistant, user, tmp_path=None, store=store)
    emitted: list[tuple[str, float, object]] = []  # (thread, time, event) as the engine emits them
    emit = rig.engine.core._emit

    def spy_emit(event: object) -> None:
        emitted.append((threading.current_thread().name, time.perf_counter(), event))
        emit(event)

    fsyncs: list[tuple[str, float]] = []
    real_fsync = os.fsync

    def spy_fsync(fd: int) -> None:
        fsyncs.append((threading.current_thread().name, time.perf_counter()))
        real_fsync(fd)

    monkeypatch.setattr(rig.engine.core, "_emit", spy_emit)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    run_rig(rig)
    assert rig.engine.error is None and len(rig.engine.reports) == 2

    # each window: from the end of the user's turn (UserAudio) to the turn's first audio block
    ends = [(t, e.turn) for _, t, e in emitted if isinstance(e, UserAudio)]
    firsts = []
    for end, _turn in ends:
        firsts.append(min(t for _, t, e in emitted if isinstance(e, AudioChunk) and t > end))
    assert len(ends) == 2
    for (end, _turn), first in zip(ends, firsts, strict=True):
        assert not [w for w in store.writes if w[0] == MODEL_THREAD and end <= w[1] <= first]
        assert not [f for f in fsyncs if f[0] == MODEL_THREAD and end <= f[1] <= first]
    # stronger still: the model and capture threads never write at all; the writer did every write
    assert {w[0] for w in store.writes} == {"glmvoice-writer"}
    assert {f[0] for f in fsyncs} == {"glmvoice-writer"}
    kinds = [w[2] for w in store.writes]
    assert kinds.count("user audio") == 2 and kinds.count("user line") == 2 and kinds.count("assistant line") == 2
    # the user's speech is written from the end of the turn on, before its transcript line
    assert kinds.index("user audio") < kinds.index("user line")
    lines = _lines(store)
    assert [line["role"] for line in lines] == ["user", "assistant"] * 2
    assert [line["audio"] for line in lines[::2]] == [e.audio_path for _, _, e in emitted if isinstance(e, UserAudio)]
    for line in lines:
        assert (store.path / line["audio"]).is_file()


def test_a_model_failure_keeps_its_cause_and_what_the_user_said(
        assistant: Assistant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(assistant, "respond_in_steps", broken)
    user = np.concatenate([silence(0.5), burst(1.0), silence(3.0)])
    rig = make_rig(assistant, user, tmp_path=tmp_path)
    run_rig(rig)
    error = rig.engine.error
    assert isinstance(error, GlmVoiceError) and "RuntimeError" in str(error)
    assert isinstance(error.__cause__, RuntimeError) and error.__cause__.__traceback__ is not None
    assert rig.store is not None
    lines = _lines(rig.store)
    assert [line["role"] for line in lines] == ["user", "assistant"]
    assert lines[0]["token_ids"] == [] and lines[1]["interrupted"] is True
    saved = rig.store.path / lines[0]["audio"]
    assert saved.is_file() and lines[0]["duration_s"] == pytest.approx(len(burst(1.0)) / RATE, abs=0.5)


class _FullDiskStore(SessionStore):
    def save_audio(self, role: str, samples: np.ndarray | None, sample_rate: int,
                   name: str | None = None) -> AudioFile | None:
        if samples is None or len(samples) == 0:
            return None
        raise SessionError(f"cannot write {self.path}: No space left on device")


def test_a_disk_failure_in_the_writer_ends_the_chat_with_one_error(assistant: Assistant, tmp_path: Path) -> None:
    store = _FullDiskStore(SessionStore.create(session_dir=tmp_path / "s").path)
    config = EngineConfig(generation=GenerationOptions(max_new_tokens=10, seed=1))
    engine = ChatEngine(assistant, None, NullSink(), store=store, config=config)
    engine.type_text("Hello.")
    engine.end_input()
    engine.run()  # returns: the model thread never waits on the writer
    assert isinstance(engine.error, SessionError) and "No space left" in str(engine.error)
    lines = _lines(store)  # the typed line needed no audio; the answer's audio could not be written ...
    assert (lines[0]["role"], lines[0]["text"]) == ("user", "Hello.")
    assert [line["role"] for line in lines] == ["user", "assistant"]  # ... but its line (ids, text) is kept
    assert lines[1]["audio"] is None and lines[1]["token_ids"]


def test_the_writer_saves_every_turn_it_was_given_before_it_ends(tmp_path: Path) -> None:
    """A queue the engine filled and ended: the writer drains all of it, in order, then stops."""
    import queue

    store = SessionStore.create(session_dir=tmp_path / "s")
    events: queue.Queue[object | None] = queue.Queue()
    errors: list[GlmVoiceError] = []
    speech = burst(0.5)
    events.put(UserAudio(1, speech, RATE, store.audio_name("user")))
    events.put(UserUtterance(0.5, text=None, turn=1, token_ids=(1, 2)))
    events.put(UserUtterance(0.0))  # discarded speech: nothing to save
    events.put(AssistantTurn(1, np.zeros(100, np.float32), 22_050, text="hi", token_ids=(3,),
                             interrupted=True, timings=TurnTimings(tokens=1)))
    events.put(UserUtterance(0.0, text="typed", typed=True, turn=2, token_ids=(4,)))
    events.put(None)
    writer = SessionWriter(store, events, errors.append)
    writer.start()
    writer.join(10)
    assert not errors
    lines = _lines(store)
    assert [(line["role"], line["text"], line["token_ids"]) for line in lines] == [
        ("user", None, [1, 2]), ("assistant", "hi", [3]), ("user", "typed", [4])]
    assert lines[0]["audio"] == "audio/0001-user.wav" and lines[1]["audio"] == "audio/0002-assistant.wav"
    assert lines[1]["interrupted"] is True and lines[1]["timings"]["tokens"] == 1
