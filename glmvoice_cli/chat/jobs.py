"""What travels from a conversation's input side to its model work: turns, heard audio, truncations."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from glmvoice_cli.audio.vad import SpeechStarted
from glmvoice_cli.errors import LMServerError


@dataclass
class Job:
    """One user turn on its way through the model work."""

    samples: np.ndarray | None = None  # (n,) float32 16 kHz speech; None for a typed turn
    turn: int = 0  # numbered when registered, from 1
    audio_path: str | None = None  # the name the store reserved for the speech
    answer_audio_path: str | None = None  # and for the answer's, reserved with it: files in conversation order
    text: str | None = None  # the typed text
    end_sample: int = 0  # end of the utterance on the input timeline (16 kHz samples)
    heard_at: float = 0.0  # perf_counter when the turn was complete (end of speech)
    cancel: threading.Event = field(default_factory=threading.Event)
    generated: threading.Event = field(default_factory=threading.Event)  # the answer is fully generated
    barge_in: SpeechStarted | None = None  # the onset that cut this turn
    stopped: bool = False  # cut by stop() (Ctrl-C, a failure)
    error: LMServerError | None = None  # the LM server failed this turn (the chat goes on)
    base_played: int | None = None  # output.played when the answer started (None: not started yet)
    heard: int | None = None  # answer samples the transport says were heard (None: the output's count)
    turn_start: int | None = None  # input sample where the spoken turn began (the listener's turn id)
    voice_end_at: float | None = None  # perf_counter when the last voiced frame was read (end of voice)
    voice_end_sample: int | None = None  # on the input timeline: the end of the last voiced frame
    confirmed_sample: int | None = None  # on the input timeline: where the end of the turn was confirmed
    speculative: bool = False  # started at a pause: held back (never played, saved or shown) until confirmed
    confirmed: threading.Event = field(default_factory=threading.Event)  # the pause was the end of the turn
    idle: threading.Event = field(default_factory=threading.Event)  # generated, waiting for the verdict
    tail_frames: int | None = None  # mel frames the listener still had to tokenize at the end of the turn
    failed: bool = False  # a speculative answer that failed: the end of turn runs the turn afresh
    shed: bool = False  # a speculative answer dropped under load: the end of turn runs the turn afresh
    claimed: bool = False  # the end of turn took this speculative answer (it can no longer be shed)


@dataclass(frozen=True)
class Heard:
    """Audio of the turn in progress, for the listener."""

    turn_start: int
    samples: np.ndarray


@dataclass(frozen=True)
class Truncation:
    """The transport says the user heard only `heard` samples of a finished answer."""

    turn: int
    heard: int


END = object()  # no more input: finish the queued turns and stop
