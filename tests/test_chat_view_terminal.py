"""The chat view on a real pseudo-terminal: typed turns leave no copy of the view's first line behind.

In the terminal's cooked mode, Enter was echoed as a newline on the line the live view redraws: the
cursor went one line down, Rich's next redraw moved up by the view's height from there, and the old
first line (the header of the transcript) stayed on screen, one more copy per typed turn. Keys are now
read in cbreak mode without echo (`chat.keys`). This test types turns through a pty exactly as the chat
command does, replays what the terminal received through a small screen model, and compares the
screen with the view alone; with echo left on (the old way), the same check finds the stray lines.
"""

from __future__ import annotations

import contextlib
import io
import os
import pty
import queue
import re
import threading
import time
from collections.abc import Iterator

import pytest
from rich.console import Console

from glmvoice_cli.events import ChatState, StatusChanged, TextDelta, TurnEnded, UserUtterance
from glmvoice_cli.ui.keys import cbreak, read_keys
from glmvoice_cli.ui.live_view import DraftChanged, LiveView, render

WIDTH, HEIGHT = 60, 30
TURNS = ("hello there", "what time is it", "thanks")
_CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])")
WAIT_S = 10.0


def _screen(output: str, width: int = WIDTH) -> list[str]:
    """The lines a terminal shows after `output`: text, CR, LF, cursor up (CSI n A) and erase line
    (CSI 2K), which is all Rich's Live uses; other escape sequences (colours, cursor shape) change nothing
    here. The screen never scrolls (the view is shorter than the terminal)."""
    lines: list[list[str]] = [[]]
    row = col = 0
    i = 0
    while i < len(output):
        match = _CSI.match(output, i)
        if match:
            args, final = match.groups()
            if final == "A":
                row = max(0, row - int(args or 1))
            elif final == "K":
                lines[row] = [] if args == "2" else lines[row][:col]
            i = match.end()
            continue
        char = output[i]
        i += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
            lines.extend([] for _ in range(row + 1 - len(lines)))
        elif char.isprintable() and col < width:
            line = lines[row]
            line.extend(" " for _ in range(col + 1 - len(line)))
            line[col] = char
            col += 1
    return [("".join(line)).rstrip() for line in lines]


def _drain(fd: int, into: list[bytes], stop: threading.Event) -> None:
    """Read what the terminal shows, so the view's writes never block on a full pty buffer."""
    import select

    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                into.append(os.read(fd, 65536))
            except OSError:
                return


def _wait_for(condition, timeout_s: float = WAIT_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


@contextlib.contextmanager
def _echo_on(fd: int) -> Iterator[bool]:
    """The terminal as it was before the fix: cooked mode, echo on."""
    import termios

    mode = termios.tcgetattr(fd)
    mode[3] |= termios.ECHO | termios.ICANON
    termios.tcsetattr(fd, termios.TCSANOW, mode)
    yield True


def _chat_on_a_pty(keys_mode) -> tuple[list[str], list[str]]:  # type: ignore[no-untyped-def]
    """Type TURNS into a live view on a pty; (the terminal's screen, the view's own last frame)."""
    leader, follower = pty.openpty()
    shown: list[bytes] = []
    stop = threading.Event()
    drain = threading.Thread(target=_drain, args=(leader, shown, stop), daemon=True)
    drain.start()
    out = os.fdopen(os.dup(follower), "w", encoding="utf-8", buffering=1)
    console = Console(file=out, width=WIDTH, height=HEIGHT, force_terminal=True, force_interactive=True,
                      color_system=None, legacy_windows=False)
    events: queue.Queue[object] = queue.Queue()
    answered: list[str] = []

    def on_line(line: str) -> None:  # what the engine puts on the queue for a typed turn and its answer
        events.put(UserUtterance(0.0, line, typed=True))
        events.put(StatusChanged(ChatState.SPEAKING, 0.0))
        events.put(TextDelta(f"answer to {line}"))
        events.put(TurnEnded())
        events.put(StatusChanged(ChatState.LISTENING, 0.0))
        answered.append(line)

    view = LiveView(console, poll_s=0.02)
    view.state.text_mode, view.state.draft = True, ""
    try:
        with keys_mode(follower):
            reader = threading.Thread(
                target=read_keys, args=(follower, lambda d: events.put(DraftChanged(d)), on_line, lambda: False),
                daemon=True)
            reader.start()
            viewer = threading.Thread(target=view.run, args=(events,), daemon=True)
            viewer.start()
            for n, turn in enumerate(TURNS, 1):
                time.sleep(0.1)  # a few redraws between keys, as when a person types
                os.write(leader, f"{turn}\r".encode())
                _wait_for(lambda n=n: len(answered) == n)
            time.sleep(0.2)
            os.write(leader, b"\x04")  # Ctrl-D: end of typed input
            reader.join(WAIT_S)
            events.put(None)
            viewer.join(WAIT_S)
            assert not viewer.is_alive()
        out.flush()
        time.sleep(0.2)
    finally:
        stop.set()
        drain.join(WAIT_S)
        out.close()
        os.close(leader)
        os.close(follower)
    frame = io.StringIO()
    final = Console(file=frame, width=WIDTH, height=HEIGHT, color_system=None)
    final.print(render(view.state, console=final))
    screen = _screen(b"".join(shown).decode("utf-8", errors="replace"))
    while screen and not screen[-1]:
        screen.pop()
    return screen, [line.rstrip() for line in frame.getvalue().rstrip("\n").split("\n")]


def test_typed_turns_leave_no_copy_of_the_first_line() -> None:
    pytest.importorskip("termios")
    screen, view = _chat_on_a_pty(cbreak)
    assert view[0].startswith("you") and TURNS[0] in view[0]  # the view's first line: the first turn
    assert screen == view  # nothing but the view: no echoed keys, no stray copies of its first line
    assert [line for line in screen if line.startswith("you")] == [f"you  (typed) {t}" for t in TURNS]


def test_the_same_check_finds_stray_lines_with_echo_on() -> None:
    """The old way (cooked mode, echo on): stray lines above the view (copies of its first lines, echoed keys
    where the timing puts them), which the test above rules out."""
    pytest.importorskip("termios")
    screen, view = _chat_on_a_pty(_echo_on)
    assert len(screen) > len(view)  # the view itself is drawn last, below them
