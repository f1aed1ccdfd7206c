"""Session folders: append-only transcript, per-turn audio, loading, resuming, listing, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from glmvoice_cli.config import SAMPLE_RATE_IN, SAMPLE_RATE_OUT
from glmvoice_cli.events import TurnTimings
from glmvoice_cli.sessions.store import (
    META_FILE,
    TRANSCRIPT_FILE,
    SessionError,
    SessionNotFoundError,
    SessionStore,
    list_sessions,
    load_session,
    new_session_id,
    sessions_root,
)


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def two_turns(store: SessionStore) -> None:
    store.append_user(tone(1.0, SAMPLE_RATE_IN), text="hello", token_ids=[1, 2, 3])
    store.append_assistant(
        tone(0.5, SAMPLE_RATE_OUT),
        text="Hi, how can I help?",
        token_ids=np.array([7, 8, 9, 10]),
        interrupted=True,
        timings=TurnTimings(0.25, 0.5, 0.4, 4),
    )


def test_round_trip_writes_audio_meta_and_lines(tmp_path: Path):
    store = SessionStore.create(session_dir=tmp_path / "S", models={"lm": tmp_path / "lm"}, mode="voice")
    two_turns(store)
    saved = load_session(tmp_path / "S")
    assert saved.warnings == ()
    user, assistant = saved.turns
    assert (user.role, user.text, user.token_ids, user.interrupted) == ("user", "hello", (1, 2, 3), False)
    assert assistant.role == "assistant" and assistant.interrupted and assistant.token_ids == (7, 8, 9, 10)
    assert assistant.timings == {
        "first_token_s": 0.25,
        "first_audio_s": 0.5,
        "real_time_factor": 0.4,
        "tokens": 4,
    }
    assert TurnTimings.from_dict(assistant.timings) == TurnTimings(0.25, 0.5, 0.4, 4)
    for turn, rate, seconds in ((user, SAMPLE_RATE_IN, 1.0), (assistant, SAMPLE_RATE_OUT, 0.5)):
        assert not Path(turn.audio).is_absolute()
        info = sf.info(str(saved.path / turn.audio))
        assert info.samplerate == rate and info.frames == int(seconds * rate)
        assert turn.duration_s == seconds and turn.created.endswith("+00:00")
    meta = json.loads((saved.path / META_FILE).read_text())
    assert meta["mode"] == "voice" and meta["models"] == {"lm": str(tmp_path / "lm")} and meta["created"]
    lines = (saved.path / TRANSCRIPT_FILE).read_text().splitlines()
    assert [json.loads(line)["role"] for line in lines] == ["user", "assistant"]
    for key in ("role", "audio", "text", "interrupted", "token_ids", "timings", "created"):
        assert key in json.loads(lines[1])


def test_each_append_is_on_disk_at_once(tmp_path: Path):
    store = SessionStore.create(session_dir=tmp_path / "S")
    store.append_user(tone(0.2, SAMPLE_RATE_IN))
    assert len(load_session(store.path).turns) == 1  # read back while the store is still open
    store.append_assistant(None, text="typed answer without audio")
    assert [t.audio for t in load_session(store.path).turns] == ["audio/0001-user.wav", None]


def test_typed_turn_has_no_audio(tmp_path: Path):
    store = SessionStore.create(session_dir=tmp_path / "S", mode="text")
    record = store.append_user(None, text="typed question", token_ids=[5])
    assert record.audio is None and record.duration_s is None and record.text == "typed question"


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path: Path):
    store = SessionStore.create(session_dir=tmp_path / "S")
    two_turns(store)
    with store.transcript_path.open("a") as fh:
        fh.write('{"role": "user", "audio": "audio/0003-us')  # a crash mid-write
    saved = load_session(store.path)
    assert [t.role for t in saved.turns] == ["user", "assistant"]
    assert len(saved.warnings) == 1 and "incomplete" in saved.warnings[0]


def test_bad_middle_line_is_skipped_and_later_turns_kept(tmp_path: Path):
    store = SessionStore.create(session_dir=tmp_path / "S")
    store.append_user(None, text="one")
    with store.transcript_path.open("a") as fh:
        fh.write('{"role": "robot"}\n')
    store.append_user(None, text="three")
    saved = load_session(store.path)
    assert [t.text for t in saved.turns] == ["one", "three"]
    assert "line 2" in saved.warnings[0]


def test_resume_appends_to_the_same_file_after_a_crash(tmp_path: Path):
    store = SessionStore.create(session_dir=tmp_path / "S")
    two_turns(store)
    with store.transcript_path.open("a") as fh:
        fh.write('{"role": "assi')
    resumed = SessionStore.resume(tmp_path / "S")
    assert resumed.path == store.path and len(resumed.turns) == 2 and resumed.warnings
    record = resumed.append_user(tone(0.3, SAMPLE_RATE_IN), text="again")
    assert record.audio == "audio/0003-user.wav"
    saved = load_session(store.path)
    assert [t.text for t in saved.turns] == ["hello", "Hi, how can I help?", "again"]
    assert saved.warnings == ()


def test_resume_keeps_a_complete_last_line_missing_its_newline(tmp_path: Path):
    store = SessionStore.create(session_dir=tmp_path / "S")
    store.append_user(None, text="one")
    data = store.transcript_path.read_bytes()
    store.transcript_path.write_bytes(data.rstrip(b"\n"))
    resumed = SessionStore.resume(store.path)
    resumed.append_user(None, text="two")
    assert [t.text for t in load_session(store.path).turns] == ["one", "two"]


def test_resume_never_overwrites_audio_of_a_lost_line(tmp_path: Path):
    store = SessionStore.create(session_dir=tmp_path / "S")
    store.append_user(tone(0.2, SAMPLE_RATE_IN))
    orphan = store.path / "audio" / "0002-assistant.wav"
    orphan.write_bytes(b"left by a crash")
    record = SessionStore.resume(store.path).append_assistant(tone(0.2, SAMPLE_RATE_OUT))
    assert record.audio == "audio/0003-assistant.wav" and orphan.read_bytes() == b"left by a crash"


def test_default_location_respects_glmvoice_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GLMVOICE_HOME", str(tmp_path / "home"))
    assert sessions_root() == tmp_path / "home" / "sessions"
    store = SessionStore.create()
    assert store.path.parent == tmp_path / "home" / "sessions"
    store.append_user(None, text="hi")
    assert load_session(store.id).turns[0].text == "hi"  # found by ID alone


def test_default_location_without_home_is_the_platform_data_folder(monkeypatch: pytest.MonkeyPatch):
    import platformdirs

    monkeypatch.delenv("GLMVOICE_HOME")
    assert sessions_root() == Path(platformdirs.user_data_dir("glmvoice")) / "sessions"


def test_list_sessions_oldest_first_with_turn_counts(tmp_path: Path):
    first = SessionStore.create()
    first.append_user(None, text="a")
    first.append_assistant(None, text="b")
    second = SessionStore.create()
    (sessions_root() / "not-a-session").mkdir()
    infos = list_sessions()
    assert [i.id for i in infos] == [first.id, second.id]
    assert [i.turns for i in infos] == [2, 0]
    assert infos[0].mode == "voice" and infos[0].created
    assert list_sessions(tmp_path / "nowhere") == []


def test_session_ids_sort_by_time_and_a_taken_name_is_never_reused(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import datetime, timezone

    from glmvoice_cli.sessions import store

    early = new_session_id(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    late = new_session_id(datetime(2026, 1, 2, 3, 4, 6, tzinfo=timezone.utc))
    assert early < late and early.startswith("20260102-030405-") and len(early.split("-")) == 3
    # Two sessions started in the same second may draw the same suffix: the second gets another name.
    names = iter(["20260102-030405-aaaa", "20260102-030405-aaaa", "20260102-030405-bbbb"])
    monkeypatch.setattr(store, "new_session_id", lambda: next(names))
    monkeypatch.setattr(store, "sessions_root", lambda: tmp_path)
    first, second = store._claim_folder(None), store._claim_folder(None)
    assert (first.name, second.name) == ("20260102-030405-aaaa", "20260102-030405-bbbb")


def test_unknown_session_is_a_clear_error(tmp_path: Path):
    with pytest.raises(SessionNotFoundError, match="unknown session 'nope'"):
        load_session("nope")
    with pytest.raises(SessionNotFoundError, match="not a glmvoice session folder"):
        SessionStore.resume(tmp_path)


def test_unwritable_folder_is_a_clear_error(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SessionError, match="cannot create session folder"):
        SessionStore.create(session_dir=blocker / "S")


def test_unwritable_session_folder_is_a_clear_error(tmp_path: Path):
    """A folder the store cannot fill (here a file stands where audio/ goes: unwritable even for root)."""
    folder = tmp_path / "blocked"
    folder.mkdir()
    (folder / "audio").write_text("not a folder")
    with pytest.raises(SessionError, match="cannot write session folder"):
        SessionStore.create(session_dir=folder)


def test_existing_session_folder_is_not_overwritten(tmp_path: Path):
    store = SessionStore.create(session_dir=tmp_path / "S")
    store.append_user(None, text="keep me")
    with pytest.raises(SessionError, match="--resume"):
        SessionStore.create(session_dir=tmp_path / "S")
    assert load_session(tmp_path / "S").turns[0].text == "keep me"


def test_missing_meta_is_a_warning_not_an_error(tmp_path: Path):
    store = SessionStore.create(session_dir=tmp_path / "S")
    store.append_user(None, text="x")
    (store.path / META_FILE).unlink()
    saved = load_session(store.path)
    assert saved.meta == {} and len(saved.turns) == 1 and "meta.json" in saved.warnings[0]
