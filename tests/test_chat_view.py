"""The chat view: the typed draft is drawn, text mode shows no microphone, and the newest text and the
status line stay on screen at any terminal height."""

from __future__ import annotations

import io
import os
import pty
import threading

import pytest
from rich.console import Console

from glmvoice_cli.events import ChatState, StatusChanged, TextDelta, UserUtterance
from glmvoice_cli.ui.keys import LineEditor, cbreak, read_keys
from glmvoice_cli.ui.live_view import DraftChanged, TranscriptState, render

WORDS = [f"word{i:03d}" for i in range(400)]


def _screen(state: TranscriptState, height: int, width: int = 60) -> list[str]:
    console = Console(record=True, width=width, height=height, color_system=None, file=io.StringIO())
    console.print(render(state, console=console))
    return console.export_text().rstrip("\n").split("\n")


def _long_answer() -> TranscriptState:
    state = TranscriptState()
    state.apply(UserUtterance(1.0, "tell me everything", typed=True))
    state.apply(TextDelta(" ".join(WORDS)))
    state.apply(StatusChanged(ChatState.SPEAKING, 0.1))
    return state


@pytest.mark.parametrize("height", [4, 6, 10, 24, 60])
def test_a_long_answer_keeps_its_newest_words_and_the_status_on_screen(height: int) -> None:
    lines = _screen(_long_answer(), height)
    assert len(lines) <= height
    assert lines[-1].startswith("● speaking")
    visible = " ".join(lines[:-1])
    assert WORDS[-1] in visible  # the newest text, not the oldest
    if height >= 6:
        assert "earlier lines" in lines[0]  # older text scrolled off, and says so


def test_a_short_conversation_is_shown_whole() -> None:
    state = TranscriptState()
    state.apply(UserUtterance(1.0, "hi", typed=True))
    state.apply(TextDelta("hello"))
    lines = _screen(state, 24)
    assert "earlier" not in "\n".join(lines) and any("hello" in line for line in lines)


def test_text_mode_shows_no_listening_and_no_meter() -> None:
    state = TranscriptState(text_mode=True, draft="")
    state.apply(StatusChanged(ChatState.LISTENING, 0.0))
    status = _screen(state, 10)[-1]
    assert "listening" not in status and "mic" not in status and "type a line" in status
    voice = TranscriptState()
    voice.apply(StatusChanged(ChatState.LISTENING, 0.0))
    assert "listening" in _screen(voice, 10)[-1] and "mic" in _screen(voice, 10)[-1]


def test_the_draft_is_drawn_while_typing() -> None:
    state = TranscriptState(text_mode=True, draft="")
    state.apply(DraftChanged("what is the weath"))
    lines = _screen(state, 10)
    assert lines[-2].startswith("type what is the weath")
    state.apply(DraftChanged(""))
    assert "weath" not in "\n".join(_screen(state, 10))


def test_line_editor_keys() -> None:
    editor = LineEditor()
    assert editor.feed("hel\x1b[Dlo wor\x7f\x7f\x7fx\rnext one\x17two") == ["hello x"]
    assert editor.draft == "next two"
    editor.feed("\x15")
    assert editor.draft == ""
    editor.feed("\x04")
    assert editor.eof


def test_keys_from_a_terminal_without_echo() -> None:
    import termios

    leader, follower = pty.openpty()
    drafts: list[str] = []
    lines: list[str] = []
    try:
        with cbreak(follower) as raw:
            assert raw
            assert not termios.tcgetattr(follower)[3] & termios.ECHO  # the view draws, the terminal does not
            reader = threading.Thread(target=read_keys, args=(follower, drafts.append, lines.append, lambda: False))
            reader.start()
            os.write(leader, "héllo\rbye".encode())
            _wait_for(lambda: "bye" in drafts)
            os.write(leader, b"\x04")  # Ctrl-D on a non-empty draft: ignored
            os.write(leader, b"\r")
            _wait_for(lambda: drafts[-1] == "")
            os.write(leader, b"\x04")
            reader.join(timeout=10)
        assert termios.tcgetattr(follower)[3] & termios.ECHO  # restored
    finally:
        os.close(leader)
        os.close(follower)
    assert not reader.is_alive()
    assert lines == ["héllo", "bye"]
    assert drafts[-1] == "" and "bye" in drafts


def _wait_for(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_cbreak_on_a_non_terminal_is_a_no_op(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with open(tmp_path / "f", "w") as f, cbreak(f.fileno()) as raw:
        assert raw is False


def test_the_live_view_ends_its_last_line_when_redirected() -> None:
    """Piped or redirected, the final status line ends with a newline: the latency summary and the
    "session saved" line that follow start on lines of their own."""
    import queue

    from glmvoice_cli.ui.live_view import LiveView

    out = io.StringIO()
    events: queue.Queue = queue.Queue()
    events.put(None)
    LiveView(Console(file=out, width=60, color_system=None)).run(events)
    assert out.getvalue().endswith("silent\n")
