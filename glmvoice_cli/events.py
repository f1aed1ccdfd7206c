"""Events from the chat engine to its consumers (the live view, the session store, tests).

The engine's worker thread puts these on a queue; consumers only read them. Every event is a frozen
dataclass holding plain data (numbers, strings, numpy arrays), so nothing here imports torch and an
event can cross threads without copying model state.

One spoken exchange produces, in order::

    StatusChanged(LISTENING) -> UserTurnStarted -> UserAudio -> StatusChanged(THINKING) -> UserUtterance
    -> TextDelta / AudioChunk ... (interleaved, StatusChanged(SPEAKING) at the first chunk)
    -> AssistantTurn -> TurnEnded -> StatusChanged(LISTENING)

UserAudio, UserUtterance (with a `turn`) and AssistantTurn carry all a session store needs, so the
store is written by its own thread from these events (`chat.writer`), never by the model thread.

A barge-in inserts UserTurnStarted and Interrupted before the assistant's TurnEnded(interrupted=True).

Every event carries, as keyword-only fields, the id of the conversation it belongs to (`conversation`,
stamped by the conversation core), and the events of a turn carry its number (`turn`); audio events say
where their samples sit (`at_sample`: on the input timeline for the user's speech, from the start of the
answer for its audio), so a transport (the terminal, a WebSocket) maps them to its protocol without guessing.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from glmvoice_cli.config import SAMPLE_RATE_IN, SAMPLE_RATE_OUT


class ChatState(enum.Enum):
    """What the assistant is doing; the value is the label the status line shows."""

    IDLE = "idle"  # not started, or ended
    LISTENING = "listening"  # waiting for, or recording, the user's turn
    THINKING = "thinking"  # the utterance is being tokenized, the LM has not produced audio yet
    SPEAKING = "speaking"  # decoded audio is being played
    INTERRUPTED = "interrupted"  # barge-in: generation stopped, playback flushed


@dataclass(frozen=True, kw_only=True)
class Tagged:
    """The fields every event shares (keyword-only, so each event's own fields stay positional)."""

    conversation: str | None = None  # the conversation core's id (None: emitted outside a conversation)


_ALWAYS_STORED = ("first_token_s", "first_audio_s", "real_time_factor", "tokens")  # format 1's keys


@dataclass(frozen=True)
class TurnTimings:
    """Latency breakdown of one assistant turn; None where the turn never got that far.

    In the chat, every time is in seconds from the end of the user's voice (the end of their last
    voiced frame, not the end of the silence that confirmed the turn); work done before the end of
    the turn (while the user spoke or paused) shows as a negative time. `Assistant.respond` alone
    counts from its own start.
    """

    first_token_s: float | None = None  # -> first LM token
    first_audio_s: float | None = None  # -> first decoded audio block
    real_time_factor: float | None = None  # generation + decoding time / seconds of audio produced
    tokens: int = 0  # LM tokens generated (text and audio)
    turn_confirmed_s: float | None = None  # -> the end-of-turn silence confirmed the turn
    last_block_s: float | None = None  # -> the last block completed while speaking was tokenized
    tokenized_s: float | None = None  # -> the whole turn's ids were ready
    prefill_s: float | None = None  # -> the LM's prefill of the turn was done
    first_text_s: float | None = None  # -> first text token
    first_audio_token_s: float | None = None  # -> first audio token
    first_sample_s: float | None = None  # -> first answer sample written to the output

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the session transcript stores it); breakdown marks never reached are left out."""
        return {k: v for k, v in asdict(self).items() if k in _ALWAYS_STORED or v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurnTimings:
        """The inverse of to_dict; unknown keys (from a newer version) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class UserTurnStarted(Tagged):
    """Voice activity confirmed: the user has started speaking (also the barge-in trigger)."""

    at_sample: int | None = None  # input sample of the first voiced frame (None: not from a microphone)


@dataclass(frozen=True, eq=False)
class UserAudio(Tagged):
    """A spoken user turn is complete (end of speech): its audio, to be saved at once, off the model thread."""

    turn: int  # the engine's turn number, shared by the UserUtterance and AssistantTurn of the same turn
    samples: np.ndarray  # (n,) float32 speech
    sample_rate: int = SAMPLE_RATE_IN  # Hz
    audio_path: str | None = None  # the name reserved for it in the session folder
    at_sample: int | None = None  # input sample where the turn's audio begins


@dataclass(frozen=True)
class UserUtterance(Tagged):
    """The user's turn is in the history: spoken (duration_s > 0) or typed (typed=True, text set).

    `turn` is None for speech the VAD discarded (the event only closes the view's open user turn).
    """

    duration_s: float  # seconds of speech, 0.0 for a typed turn
    text: str | None = None  # the transcript (with --transcribe-user) or the typed text
    audio_path: str | None = None  # where the turn's audio is saved, when it is
    typed: bool = False  # entered with the keyboard rather than spoken
    turn: int | None = None  # the engine's turn number (see UserAudio)
    token_ids: tuple[int, ...] = ()  # the user's part of the LM history (empty if the LM never took it)


@dataclass(frozen=True)
class TypedQueued(Tagged):
    """A typed turn that waits for the answer under way (its UserUtterance comes when the model takes it)."""

    text: str
    turn: int | None = None


@dataclass(frozen=True)
class TextDelta(Tagged):
    """A piece of the assistant's text, as the LM produces it."""

    text: str
    turn: int | None = None  # the turn it answers


@dataclass(frozen=True, eq=False)  # arrays make == ambiguous: compare events by identity
class AudioChunk(Tagged):
    """A block of decoded assistant speech, ready to play."""

    samples: np.ndarray  # (n,) float32 in [-1, 1]
    sample_rate: int = SAMPLE_RATE_OUT  # Hz
    turn: int | None = None  # the turn it answers
    at_sample: int = 0  # position of its first sample in the answer's audio

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class Interrupted(Tagged):
    """Barge-in: the assistant's answer was cut; played_s is how much of it the user heard."""

    played_s: float | None = None  # seconds of the answer actually played before the cut
    turn: int | None = None  # the turn whose answer was cut (the first, if several were open)


@dataclass(frozen=True)
class TurnEnded(Tagged):
    """The assistant's turn is over, finished or cut."""

    interrupted: bool = False
    reason: str = "done"  # "done" | "max_tokens" | "context_full" | "barge_in" | "cancelled" | "error"
    timings: TurnTimings = field(default_factory=TurnTimings)
    turn: int | None = None  # the turn it ends


@dataclass(frozen=True, eq=False)
class AssistantTurn(Tagged):
    """What one answer left behind, for the session store; emitted just before the engine's TurnEnded."""

    turn: int  # see UserAudio
    samples: np.ndarray | None  # (n,) float32, the part that was played; None when nothing was
    sample_rate: int = SAMPLE_RATE_OUT  # Hz
    text: str = ""  # the answer's text (what was heard, when interrupted)
    token_ids: tuple[int, ...] = ()  # the ids the history keeps
    interrupted: bool = False
    timings: TurnTimings = field(default_factory=TurnTimings)
    reason: str | None = None  # TurnEnded.reason, saved with the turn (e.g. "context_full")
    audio_path: str | None = None  # the name reserved for its audio when the turn was numbered


@dataclass(frozen=True)
class AnswerTruncated(Tagged):
    """A finished answer was trimmed after the fact (the transport said the user heard only part of it):
    the session store rewrites that turn, as if the answer had been cut there."""

    turn: int
    token_ids: tuple[int, ...]  # what the history keeps of the answer now
    text: str  # the text of what was heard
    heard_samples: int  # samples of the answer's audio heard (at the output's rate)


@dataclass(frozen=True)
class Failed(Tagged):
    """A stage failed; the message is one line for the user. The session goes on or ends."""

    message: str
    recoverable: bool = False  # True: only this turn failed or was refused, the session goes on


@dataclass(frozen=True)
class ContextTrimmed(Tagged):
    """The oldest turns no longer fit the model's context and were left out of what it sees (the session keeps
    them); emitted once per conversation, the first time it happens."""

    dropped_turns: int  # past turns left out so far


@dataclass(frozen=True)
class TurnJudged(Tagged):
    """The end-of-turn detector judged a pause in the user's turn (`--turn-detector smart`)."""

    probability: float  # that the turn is complete
    ended: bool  # at or above the threshold, with no speech since: the turn ended at the pause
    seconds: float  # what the decision cost (features + model), off the capture and model threads
    at_sample: int  # the input position the pause was judged at


@dataclass(frozen=True)
class AnswerAhead(Tagged):
    """On a virtual clock (`lockstep`), the input waits while the answer to a pause is generated ahead, held back
    until the pause proves to be the end of the turn: how far it has got, so a view shows the model at work
    rather than a turn frozen mid-speech. All zeros: the held answer was released or dropped."""

    text_chars: int = 0
    audio_s: float = 0.0


@dataclass(frozen=True)
class StatusChanged(Tagged):
    """The engine's state, and the microphone's input level, for the status line."""

    state: ChatState
    level: float = 0.0  # input RMS, linear, full scale = 1.0


ChatEvent = (
    UserTurnStarted
    | UserAudio
    | UserUtterance
    | TypedQueued
    | ContextTrimmed
    | TextDelta
    | AudioChunk
    | Interrupted
    | TurnEnded
    | AssistantTurn
    | AnswerTruncated
    | Failed
    | StatusChanged
    | AnswerAhead
)
