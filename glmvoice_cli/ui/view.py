"""How `glmvoice chat` shows the engine's events: the Rich live view, or plain lines (`--no-live`).

Both read the engine's event queue with a timeout until its None sentinel. The plain view writes
one line per user turn and streams the assistant's text on its own line, with a mark where the
answer was cut and the turn's latency breakdown; it is what scripts and tests read.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from glmvoice_cli.events import ContextTrimmed, Failed, TextDelta, TurnEnded, TurnJudged, UserUtterance
from glmvoice_cli.ui.live_view import (
    CONTEXT_FULL,
    CONTEXT_FULL_NOTE,
    context_trimmed_note,
    judged_note,
    timings_text,
)

if TYPE_CHECKING:
    from glmvoice_cli.sessions.store import TurnRecord

POLL_S = 0.1  # wait on the event queue before checking again (Ctrl-C lands in between)


def show_live(events: queue.Queue[Any], saved: Sequence[TurnRecord] = (), text_mode: bool = False,
              typing: bool = False) -> None:
    """The Rich live transcript, starting from a resumed session's saved turns. `text_mode`: no microphone
    status; `typing`: the line being typed is drawn (keys come as DraftChanged events)."""
    from rich.console import Console

    from glmvoice_cli.ui.live_view import LiveView, replay

    view = LiveView(Console(stderr=False))
    view.state = replay(saved)
    view.state.text_mode = text_mode
    view.state.draft = "" if typing else None
    view.run(events)


class PlainView:
    """Plain text lines, flushed as they come."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._speaking = False  # an assistant line is open
        self._judged: TurnJudged | None = None  # the detector ended the turn being shown next

    def run(self, events: queue.Queue[Any]) -> None:
        while True:
            try:
                event = events.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if event is None:
                break
            self.show(event)
        self._close_line()

    def show(self, event: object) -> None:
        if isinstance(event, UserUtterance):
            self._close_line()
            if event.typed:
                self._write(f"you (typed): {event.text}\n")
            elif event.duration_s > 0:
                where = f" [{event.audio_path}]" if event.audio_path else ""
                said = f" {event.text}" if event.text else ""
                judged = judged_note(self._judged.probability if self._judged else None)
                self._write(f"you: ({event.duration_s:.2f} s of speech{judged}){where}{said}\n")
            self._judged = None
        elif isinstance(event, TurnJudged):
            self._judged = event if event.ended else None
        elif isinstance(event, TextDelta):
            if not self._speaking:
                self._write("assistant: ")
                self._speaking = True
            self._write(event.text)
        elif isinstance(event, TurnEnded):
            if not self._speaking:
                self._write("assistant:")
            mark = " [interrupted]" if event.interrupted else ""
            mark += f" [{CONTEXT_FULL_NOTE}]" if event.reason == CONTEXT_FULL else ""
            self._write(f"{mark}\n  ({timings_text(event.timings)})\n")
            self._speaking = False
        elif isinstance(event, ContextTrimmed):
            self._close_line()
            self._write(f"note: {context_trimmed_note(event)}\n")
        elif isinstance(event, Failed):
            self._close_line()
            if event.recoverable:  # a fatal one is printed by the command as it exits
                self._write(f"error: {event.message} (the conversation goes on)\n")

    def _close_line(self) -> None:
        if self._speaking:
            self._write("\n")
            self._speaking = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
