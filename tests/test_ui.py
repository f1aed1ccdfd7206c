"""The live transcript: state folding, rendering to a recording console, and the queue-fed LiveView."""

from __future__ import annotations

import queue
import sys
import threading

import numpy as np
from rich.console import Console

from glmvoice_cli.events import (
    AudioChunk,
    ChatState,
    Failed,
    Interrupted,
    StatusChanged,
    TextDelta,
    TurnEnded,
    TurnTimings,
    UserTurnStarted,
    UserUtterance,
)
from glmvoice_cli.ui.live_view import (
    CURSOR,
    METER_CELLS,
    LiveView,
    TranscriptState,
    level_db,
    render,
    replay,
)


def text_of(state: TranscriptState, **kwargs) -> str:
    console = Console(record=True, width=100, color_system=None)
    console.print(render(state, **kwargs))
    return console.export_text()


def fold(*events) -> TranscriptState:
    state = TranscriptState()
    for event in events:
        state.apply(event)
    return state


def test_user_turn_shows_duration_and_transcript():
    state = fold(UserTurnStarted(), UserUtterance(2.4, "what is the weather"))
    out = text_of(state)
    assert "you" in out and "(2.4 s)" in out and "what is the weather" in out


def test_user_turn_while_speaking_and_without_transcript():
    assert "speaking…" in text_of(fold(UserTurnStarted()))
    out = text_of(fold(UserTurnStarted(), UserUtterance(1.25)))
    assert "(1.2 s)" in out or "(1.3 s)" in out
    assert "[speech]" in out


def test_typed_turn_is_marked():
    out = text_of(fold(UserUtterance(0.0, "hello", typed=True)))
    assert "(typed) hello" in out


def test_assistant_text_streams_with_cursor_then_closes():
    state = fold(UserUtterance(1.0, "hi"), TextDelta("Hello, "))
    assert f"Hello, {CURSOR}" in text_of(state)
    state.apply(AudioChunk(np.zeros(11025, dtype=np.float32)))
    state.apply(TextDelta("how can I help?"))
    assert f"Hello, how can I help?{CURSOR}" in text_of(state)
    assert state.turns[-1].audio_s == 0.5
    state.apply(TurnEnded(timings=TurnTimings(0.31, 0.62, 0.48, 42)))
    out = text_of(state)
    assert "Hello, how can I help?" in out and CURSOR not in out
    assert "first token 0.31 s" in out and "first audio 0.62 s" in out
    assert "RTF 0.48" in out and "42 tokens" in out


def test_barge_in_marks_the_answer_and_keeps_new_user_turn_apart():
    state = fold(
        UserUtterance(1.0, "tell me a story"),
        TextDelta("Once upon a time"),
        UserTurnStarted(),  # the user talks over the answer
        TextDelta(" there"),  # a late delta still belongs to the answer
        Interrupted(played_s=0.8),
        TurnEnded(interrupted=True, reason="barge_in", timings=TurnTimings(0.2, 0.4, 0.5, 10)),
        UserUtterance(0.9, "stop"),
    )
    roles = [t.role for t in state.turns]
    assert roles == ["user", "assistant", "user"]
    assert state.turns[1].text == "Once upon a time there" and state.turns[1].interrupted
    out = text_of(state)
    assert "interrupted" in out
    lines = out.splitlines()
    assert lines.index(next(l for l in lines if "stop" in l)) > lines.index(
        next(l for l in lines if "Once upon" in l)
    )


def test_turn_ended_interrupted_alone_marks_it():
    state = fold(TextDelta("abc"), TurnEnded(interrupted=True, reason="barge_in"))
    assert "⏹ interrupted" in text_of(state)


def test_status_line_state_and_level_meter():
    out = text_of(fold(StatusChanged(ChatState.LISTENING, level=0.1)))
    assert "listening" in out and "-20 dB" in out
    meter = out[out.index("▕") + 1 : out.index("▏")]
    assert len(meter) == METER_CELLS and 0 < meter.count("█") < METER_CELLS
    for state in (ChatState.THINKING, ChatState.SPEAKING):
        assert state.value in text_of(fold(StatusChanged(state)))
    assert "silent" in text_of(fold(StatusChanged(ChatState.SPEAKING, level=0.0)))


def test_level_db_clamps_odd_values():
    assert level_db(1.0) == 0.0
    assert level_db(4.0) == 0.0
    assert level_db(0.0) == level_db(-1.0) == level_db(float("nan")) == -60.0


def test_failure_is_shown_on_the_turn_and_cleared_by_the_next_turn():
    state = fold(TextDelta("partial"), Failed("decoder ran out of memory"))
    out = text_of(state)
    assert "failed: decoder ran out of memory" in out and "error: decoder ran out of memory" in out
    state.apply(UserUtterance(1.0, "again"))
    assert "error:" not in text_of(state)


def test_missing_timings_show_dashes():
    out = text_of(fold(TurnEnded(timings=TurnTimings(first_token_s=0.5))))
    assert "first token 0.50 s" in out and "first audio –" in out and "RTF –" in out


def test_old_turns_collapse():
    state = fold(*[UserUtterance(1.0, f"turn {i}") for i in range(5)])
    out = text_of(state, max_turns=2)
    assert "3 earlier turns" in out and "turn 4" in out and "turn 1" not in out


def _console() -> Console:
    return Console(record=True, width=100, color_system=None, file=sys.stdout, force_terminal=False)


def test_live_view_consumes_queue_until_sentinel():
    events: queue.Queue = queue.Queue()
    for event in (
        StatusChanged(ChatState.LISTENING, 0.05),
        UserUtterance(1.5, "hello"),
        TextDelta("Hi there"),
        TurnEnded(timings=TurnTimings(0.1, 0.2, 0.3, 4)),
        None,
    ):
        events.put(event)
    view = LiveView(_console(), poll_s=0.01)
    state = view.run(events)
    assert [t.role for t in state.turns] == ["user", "assistant"]
    assert state.turns[1].text == "Hi there" and not state.turns[1].open
    assert "Hi there" in view.console.export_text()


def test_live_view_stops_on_event_while_queue_is_empty():
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    view = LiveView(_console(), poll_s=0.01)
    worker = threading.Thread(target=view.run, args=(events, stop), daemon=True)
    worker.start()
    events.put(TextDelta("streaming"))
    stop.set()
    worker.join(timeout=5)
    assert not worker.is_alive()


def test_live_view_folds_a_burst_larger_than_one_redraw():
    events: queue.Queue = queue.Queue()
    for _ in range(600):
        events.put(TextDelta("x"))
    events.put(None)
    state = LiveView(_console(), poll_s=0.01).run(events)
    assert state.turns[0].text == "x" * 600


def test_replay_shows_a_saved_conversation(tmp_path):
    from glmvoice_cli.sessions.store import SessionStore

    store = SessionStore.create(session_dir=tmp_path / "S")
    store.append_user(np.zeros(16000, dtype=np.float32), text="hello")
    store.append_user(None, text="typed")
    store.append_assistant(None, text="cut short", interrupted=True, timings=TurnTimings(0.1, 0.2, 0.3, 5))
    out = text_of(replay(store.turns))
    assert "(1.0 s) hello" in out and "(typed) typed" in out
    assert "cut short" in out and "interrupted" in out and "5 tokens" in out and CURSOR not in out
