"""The live transcript: a pure state updated by engine events, a pure render, and a thin Live loop.

`TranscriptState.apply(event)` folds one event (see `events.py`) into the conversation so far;
`render(state)` turns that into a Rich renderable; `LiveView` owns a `rich.live.Live`, reads events
from a queue with a timeout, and redraws. Only `LiveView` touches the terminal, so tests check the
first two with a recording console and no thread.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from glmvoice_cli.events import (
    AnswerAhead,
    AudioChunk,
    ChatEvent,
    ChatState,
    ContextTrimmed,
    Failed,
    Interrupted,
    StatusChanged,
    TextDelta,
    TurnEnded,
    TurnJudged,
    TurnTimings,
    TypedQueued,
    UserTurnStarted,
    UserUtterance,
)

if TYPE_CHECKING:
    from glmvoice_cli.sessions.store import TurnRecord

MAX_TURNS_SHOWN = 12  # older turns collapse into one line so the live region fits a terminal
METER_CELLS = 20  # width of the input level meter, in characters
METER_FLOOR_DB = -60.0  # dBFS shown as an empty meter
POLL_S = 0.1  # seconds LiveView waits for an event before checking its stop flag
REFRESH_PER_SECOND = 12  # redraws per second while events stream in
MAX_EVENTS_PER_REDRAW = 256  # events folded in before a redraw, so a burst never starves the screen
CURSOR = "▌"  # trails the assistant's text while it streams

_STATE_STYLE = {
    ChatState.IDLE: "dim",
    ChatState.LISTENING: "bold green",
    ChatState.THINKING: "bold yellow",
    ChatState.SPEAKING: "bold magenta",
    ChatState.INTERRUPTED: "bold red",
}

CONTEXT_FULL = "context_full"  # TurnEnded.reason of an answer stopped by the model's context length
CONTEXT_FULL_NOTE = "stopped: the model's context is full (older turns are dropped next turn)"


def context_trimmed_note(event: ContextTrimmed) -> str:
    turns = "turn" if event.dropped_turns == 1 else "turns"
    return (f"the oldest {event.dropped_turns} {turns} no longer fit the model's context: it answers without "
            "them from now on (the session keeps them)")


def judged_note(probability: float | None) -> str:
    """", judged finished at 0.93" after a turn the end-of-turn detector ended ("" for one silence ended)."""
    return f", judged finished at {probability:.2f}" if probability is not None else ""


@dataclass(frozen=True)
class DraftChanged:
    """The line being typed (not yet sent with Enter): the view shows it, since the terminal's own echo
    would be overwritten by the next redraw. Put on the engine's event queue by the key reader."""

    text: str


@dataclass
class TurnView:
    """One turn as the view shows it."""

    role: str  # "user" | "assistant"
    text: str = ""  # transcript (user) or streamed text so far (assistant)
    duration_s: float | None = None  # user: seconds of speech; None while still speaking
    typed: bool = False  # user turn entered with the keyboard
    audio_s: float = 0.0  # assistant: seconds of audio received
    open: bool = True  # user: still speaking; assistant: still streaming
    interrupted: bool = False
    context_full: bool = False  # the answer stopped at the model's context length
    failed: str | None = None  # the error that ended this turn
    timings: TurnTimings | None = None
    judged: float | None = None  # user: the detector ended the turn at this probability of "finished"


@dataclass
class TranscriptState:
    """The conversation so far and the status line; changed only through `apply`."""

    turns: list[TurnView] = field(default_factory=list)
    status: ChatState = ChatState.IDLE
    level: float = 0.0  # input RMS, linear, full scale = 1.0
    error: str | None = None  # the last Failed message
    notice: str | None = None  # a note for the user until the next turn (older turns left out of the context)
    text_mode: bool = False  # chat --text: no microphone, so no "listening" and no meter
    draft: str | None = None  # the line being typed; None: no keyboard input is shown
    ahead: AnswerAhead | None = None  # a virtual-clock run generating the answer to a pause, input waiting
    queued: list[TypedQueued] = field(default_factory=list)  # typed turns waiting for the answer under way

    def apply(self, event: ChatEvent | DraftChanged) -> None:
        """Fold one engine event into the state (unknown events are ignored)."""
        if isinstance(event, DraftChanged):
            self.draft = event.text
        elif isinstance(event, AnswerAhead):
            self.ahead = event if event.text_chars or event.audio_s else None
        elif isinstance(event, TypedQueued):
            self.queued.append(event)
        elif isinstance(event, StatusChanged):
            self.status, self.level = event.state, event.level
        elif isinstance(event, UserTurnStarted):
            if self._open("user") is None:
                self.turns.append(TurnView("user"))
        elif isinstance(event, UserUtterance):
            self._apply_utterance(event)
        elif isinstance(event, TextDelta):
            self._assistant().text += event.text
        elif isinstance(event, AudioChunk):
            self._assistant().audio_s += event.seconds
        elif isinstance(event, Interrupted):
            turn = self._open("assistant") or self._last("assistant")
            if turn is not None:
                turn.interrupted = True
        elif isinstance(event, TurnEnded):
            self._apply_turn_end(event)
        elif isinstance(event, TurnJudged):
            turn = self._open("user")
            if turn is not None:
                turn.judged = event.probability if event.ended else None
        elif isinstance(event, ContextTrimmed):
            self.notice = context_trimmed_note(event)
        elif isinstance(event, Failed):
            self.error = event.message
            turn = self._open("assistant")
            if turn is not None:
                turn.failed, turn.open = event.message, False

    def _apply_utterance(self, event: UserUtterance) -> None:
        turn = self._open("user")
        if turn is None:
            turn = TurnView("user")
            self.turns.append(turn)
        turn.duration_s, turn.typed, turn.open = event.duration_s, event.typed, False
        turn.text = event.text or ""
        self.ahead = None
        if event.turn is not None:
            self.queued = [q for q in self.queued if q.turn != event.turn]
        self.error = self.notice = None  # a new turn: the last failure or note no longer describes the state

    def _apply_turn_end(self, event: TurnEnded) -> None:
        turn = self._open("assistant")
        if turn is None:  # a turn that produced nothing still shows its timings
            turn = TurnView("assistant")
            self.turns.append(turn)
        turn.open = False
        turn.interrupted = turn.interrupted or event.interrupted
        turn.context_full = event.reason == CONTEXT_FULL
        turn.timings = event.timings

    def _open(self, role: str) -> TurnView | None:
        """The turn of `role` still in progress (a user may start speaking over a streaming answer)."""
        return next((t for t in reversed(self.turns) if t.role == role and t.open), None)

    def _last(self, role: str) -> TurnView | None:
        return next((t for t in reversed(self.turns) if t.role == role), None)

    def _assistant(self) -> TurnView:
        turn = self._open("assistant")
        if turn is None:
            turn = TurnView("assistant")
            self.turns.append(turn)
        return turn


def replay(records: Iterable[TurnRecord]) -> TranscriptState:
    """The view of a saved conversation (for --resume): closed turns, their text and timings."""
    state = TranscriptState()
    for record in records:
        timings = TurnTimings.from_dict(record.timings) if record.timings else None
        state.turns.append(
            TurnView(
                role=record.role,
                text=record.text or "",
                duration_s=record.duration_s or 0.0,
                typed=record.role == "user" and record.audio is None,
                audio_s=(record.duration_s or 0.0) if record.role == "assistant" else 0.0,
                open=False,
                interrupted=record.interrupted,
                context_full=record.reason == CONTEXT_FULL,
                timings=timings,
            )
        )
    return state


def render(state: TranscriptState, max_turns: int = MAX_TURNS_SHOWN, console: Console | None = None
           ) -> RenderableType:
    """The transcript (the last `max_turns` turns) above the typed draft and the status line.

    With `console`, the whole fits its height: the newest lines of the transcript are kept and the
    older ones scroll off, so a long answer never pushes its own end or the status line off screen.
    """
    parts: list[RenderableType] = []
    hidden = max(0, len(state.turns) - max_turns)
    if hidden:
        parts.append(Text(f"… {hidden} earlier turn{'s' if hidden > 1 else ''}", style="dim"))
    for turn in state.turns[hidden:]:
        parts.extend(_render_turn(turn))
    if state.ahead is not None:
        parts.append(_ahead_line(state.ahead))
    for waiting in state.queued:
        line = Text("you  ", style="bold cyan")
        line.append("(typed, waits for the answer) ", style="dim")
        line.append(waiting.text, style="dim")
        parts.append(line)
    footer: list[RenderableType] = [Text("")]
    if state.draft is not None:
        footer.append(_draft_line(state.draft))
    footer.append(status_line(state))
    if console is not None:
        parts = _last_lines(parts, console, console.size.height - len(footer))
    return Group(*parts, *footer)


def _last_lines(parts: list[RenderableType], console: Console, budget: int) -> list[RenderableType]:
    """The tail of `parts` (Text lines, wrapped to the console's width) that fits in `budget` lines."""
    budget = max(1, budget)
    lines: list[Text] = []
    for part in parts:
        if isinstance(part, Text):
            lines.extend(part.wrap(console, console.size.width))
        else:  # pragma: no cover - the transcript is made of Text only
            lines.append(Text(str(part)))
    if len(lines) <= budget:
        return list(lines)
    kept = lines[len(lines) - (budget - 1):] if budget > 1 else lines[-1:]
    marker = [Text(f"… {len(lines) - len(kept)} earlier lines", style="dim")] if budget > 1 else []
    return [*marker, *kept]


def _draft_line(draft: str) -> Text:
    line = Text("type ", style="bold cyan")
    line.append(draft)
    line.append(CURSOR, style="cyan")
    return line


def _ahead_line(ahead: AnswerAhead) -> Text:
    """The model at work on a virtual clock: the input waits while the answer to a pause is prepared."""
    line = Text("glm  ", style="bold magenta")
    line.append("answering the pause ahead (input waits): ", style="italic dim")
    line.append(f"{ahead.audio_s:.1f} s of speech, {ahead.text_chars} characters ready", style="dim")
    return line


def _render_turn(turn: TurnView) -> list[RenderableType]:
    if turn.role == "user":
        return [_user_line(turn)]
    lines: list[RenderableType] = [_assistant_line(turn)]
    if turn.timings is not None:
        lines.append(Text("    " + timings_text(turn.timings), style="dim"))
    return lines


def _user_line(turn: TurnView) -> Text:
    line = Text("you  ", style="bold cyan")
    if turn.open:
        line.append("speaking…", style="italic dim")
        return line
    if turn.typed:
        line.append("(typed) ", style="dim")
    else:
        line.append(f"({turn.duration_s or 0.0:.1f} s{judged_note(turn.judged)}) ", style="dim")
    line.append(turn.text if turn.text else "[speech]", style="" if turn.text else "dim")
    return line


def _assistant_line(turn: TurnView) -> Text:
    line = Text("glm  ", style="bold magenta")
    if turn.text:
        line.append(turn.text)
    elif turn.open:
        line.append("thinking…", style="italic dim")
    if turn.open:
        line.append(CURSOR, style="magenta")
    if turn.audio_s and not turn.text:
        line.append(f"[{turn.audio_s:.1f} s of speech]", style="dim")
    if turn.interrupted:
        line.append("  ⏹ interrupted", style="bold yellow")
    if turn.context_full:
        line.append(f"  ⏹ {CONTEXT_FULL_NOTE}", style="bold yellow")
    if turn.failed:
        line.append(f"  ✗ failed: {turn.failed}", style="bold red")
    return line


def timings_text(timings: TurnTimings) -> str:
    """One line. With the breakdown (a chat turn): 'voice end → turn +0.70 · tok +0.71 · ... · play +1.02 ·
    RTF 0.48 · 42 tokens'; without (an older session): 'first token 0.31 s · first audio 0.62 s · ...'."""
    from glmvoice_cli.chat.turn_timing import compact_line

    if timings.turn_confirmed_s is not None:
        rtf = f"RTF {timings.real_time_factor:.2f}" if timings.real_time_factor is not None else "RTF –"
        return f"voice end → {compact_line(timings)} · {rtf} · {timings.tokens} tokens"
    parts = [
        f"first token {_seconds(timings.first_token_s)}",
        f"first audio {_seconds(timings.first_audio_s)}",
        f"RTF {timings.real_time_factor:.2f}" if timings.real_time_factor is not None else "RTF –",
        f"{timings.tokens} tokens",
    ]
    return " · ".join(parts)


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def status_line(state: TranscriptState) -> Text:
    """'● listening  mic ▕█████░░░░░▏ -32 dB' (text mode: '● your turn: type a line'), plus the last error."""
    line = Text("● ", style=_STATE_STYLE[state.status])
    if state.text_mode:
        label = "your turn: type a line, Enter sends it" if state.status is ChatState.LISTENING else \
            state.status.value
        line.append(label, style=_STATE_STYLE[state.status])
        _append_notes(line, state)
        return line
    line.append(state.status.value, style=_STATE_STYLE[state.status])
    db = level_db(state.level)
    filled = round(METER_CELLS * (db - METER_FLOOR_DB) / -METER_FLOOR_DB)
    line.append("   mic ▕", style="dim")
    line.append("█" * filled, style="green" if db < -6.0 else "red")
    line.append("░" * (METER_CELLS - filled) + "▏", style="dim")
    line.append(f" {db:.0f} dB" if db > METER_FLOOR_DB else " silent", style="dim")
    _append_notes(line, state)
    return line


def _append_notes(line: Text, state: TranscriptState) -> None:
    if state.notice:
        line.append(f"   note: {state.notice}", style="yellow")
    if state.error:
        line.append(f"   error: {state.error}", style="bold red")


def level_db(level: float) -> float:
    """Linear RMS (full scale 1.0) -> dBFS, clamped to [METER_FLOOR_DB, 0]."""
    if not level > 0.0 or not math.isfinite(level):
        return METER_FLOOR_DB
    return min(0.0, max(METER_FLOOR_DB, 20.0 * math.log10(level)))


class LiveView:
    """Draws the transcript live from a queue of events until a `None` sentinel or a stop Event.

    Every wait on the queue has a timeout, so a stalled engine never freezes the view and
    `stop.set()` ends it within POLL_S.
    """

    def __init__(self, console: Console | None = None, poll_s: float = POLL_S) -> None:
        self.console = console or Console()
        self.poll_s = poll_s
        self.state = TranscriptState()

    def run(self, events: queue.Queue, stop: threading.Event | None = None) -> TranscriptState:
        """Consume events until the sentinel (None) or `stop` is set; returns the final state."""
        stop = stop or threading.Event()
        with Live(
            render(self.state, console=self.console),
            console=self.console,
            refresh_per_second=REFRESH_PER_SECOND,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        ) as live:
            while not stop.is_set():
                ended = self._drain(events)
                live.update(render(self.state, console=self.console))
                if ended:
                    break
        if not self.console.is_terminal:  # Rich ends a live display with a newline only on a terminal: a
            self.console.line()  # redirected chat's last line would run into what is printed next
        return self.state

    def _drain(self, events: queue.Queue) -> bool:
        """Wait up to poll_s for one event, then take what else is queued; True at the sentinel."""
        try:
            event = events.get(timeout=self.poll_s)
        except queue.Empty:
            return False
        applied = 0
        while event is not None:
            self.state.apply(event)
            applied += 1
            if applied >= MAX_EVENTS_PER_REDRAW:
                return False  # redraw now; the rest waits for the next pass
            try:
                event = events.get_nowait()
            except queue.Empty:
                return False
        return True
