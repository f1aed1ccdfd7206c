"""Work done while the user is still speaking: tokenize each completed block, prefill it into the LM cache.

Runs on the model thread (all torch work does). The capture thread forwards the audio of the turn in
progress; `TurnListener.hear` pushes it into a `StreamingTokenizer` and, when the completed blocks'
ids change, extends the LM cache with the user's turn up to those ids (`VoiceLM.warm`: the cache grows,
the history does not). At the end of the turn `final_input` tokenizes only the last partial block, and
the LM's prefill only runs what the cache lacks: the last ids and the assistant prefix.

`Speculation` snapshots a conversation before a speculative answer and puts it back when the answer is
dropped, so the history is exactly what it would have been without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from glmvoice_cli.lm.backend import LMBackend
    from glmvoice_cli.lm.prompts import InputMode, SpeechInput
    from glmvoice_cli.lm.voice_lm import Conversation
    from glmvoice_cli.tokenizer.block_encoder import Span, SpanResult
    from glmvoice_cli.tokenizer.speech_tokenizer import SpeechTokenizer
    from glmvoice_cli.tokenizer.streaming import StreamingTokenizer


class SpanQueue(Protocol):
    """Where a turn's completed tokenizer blocks go to be encoded with other turns' (`pipeline.speech_batch`)."""

    def encode(self, span: Span) -> Generator[None, None, SpanResult]: ...


@dataclass
class ListenMarks:
    """perf_counter times of the current turn's streaming work (None: not reached)."""

    last_block_s: float | None = None  # the last completed block was tokenized (while speaking)
    tokenized_s: float | None = None  # the final ids were ready (only the partial tail left at the end)
    warmed_tokens: int = 0  # user-turn ids prefilled while speaking


class TurnListener:
    """Streams one spoken turn at a time into the tokenizer and the LM cache (see module docstring)."""

    def __init__(self, tokenizer: SpeechTokenizer, lm: LMBackend | None, prefill: bool = True) -> None:
        from glmvoice_cli.tokenizer.streaming import StreamingTokenizer

        self.stream: StreamingTokenizer = StreamingTokenizer(tokenizer)
        self.lm = lm if prefill else None
        self.turn_start: int | None = None  # input sample where the turn being heard begins
        self.marks = ListenMarks()

    def hear(self, turn_start: int, samples: np.ndarray, conv: Conversation,
             answer_waiting: Callable[[], bool] | None = None) -> None:
        """Audio of the turn that began at `turn_start` (a new value starts a new turn).

        When `answer_waiting()` says, once the blocks these samples complete are tokenized, that an answer to
        this turn is already queued, their ids are not prefilled on their own: the answer's prefill takes
        them with the tail in one call (on a CPU one call of n + m tokens costs less than two; a dropped
        answer `rewarm`s). This happens when the end of the voice comes while a block is being encoded.
        """
        for _ in self.hear_steps(turn_start, samples, conv, answer_waiting):
            pass

    def hear_steps(self, turn_start: int, samples: np.ndarray, conv: Conversation,
                   answer_waiting: Callable[[], bool] | None = None, spans: SpanQueue | None = None,
                   ) -> Iterator[None]:
        """`hear`; with `spans`, each completed block is encoded there (with other conversations' blocks),
        yielding while it waits its turn."""
        if turn_start != self.turn_start:
            self.stream.reset()
            self.turn_start, self.marks = turn_start, ListenMarks()
            self._warm(conv, [])  # the turn's header (and a first turn's system prompt) right away
        changed = self.stream.push(samples) if spans is None else (yield from _push_batched(self.stream, samples, spans))
        if changed:
            self.marks.last_block_s = time.perf_counter()
            if answer_waiting is None or not answer_waiting():
                self._warm(conv, self.stream.ids)

    def covers(self, turn_start: int, n_samples: int) -> bool:
        """True if the listener heard this turn's first `n_samples` (so `final_input` can answer it)."""
        return self.turn_start == turn_start and self.stream.samples >= n_samples

    def final_input(self, n_samples: int) -> SpeechInput:
        """The turn's ids for its first `n_samples`, exactly those of whole-utterance tokenization."""
        from glmvoice_cli.lm.prompts import SpeechInput

        ids = self.stream.finish(n_samples)
        self.marks.tokenized_s = time.perf_counter()
        return SpeechInput(tuple(ids))

    def rewarm(self, conv: Conversation) -> None:
        """Put the cache back to the history plus the completed blocks (after a dropped answer)."""
        self._warm(conv, self.stream.ids)

    def _warm(self, conv: Conversation, ids: list[int]) -> None:
        if self.lm is None:
            return
        prefix = user_prefix_ids(self.lm, ids, conv.system_mode)
        self.marks.warmed_tokens += self.lm.warm(conv, prefix)


def _push_batched(stream: StreamingTokenizer, samples: np.ndarray, spans: SpanQueue) -> Generator[None, None, bool]:
    """`stream.push(samples)` with each completed block encoded by `spans` (yielding while it waits)."""
    steps = stream.push_steps(samples)
    try:
        span = next(steps)
        while True:
            span = steps.send((yield from spans.encode(span)))
    except StopIteration as stop:
        return bool(stop.value)


def user_prefix_ids(lm: LMBackend, audio_ids: list[int], system_mode: InputMode | None) -> list[int]:
    """The ids a spoken turn appends to the history, up to (not including) <|end_of_audio|>."""
    from glmvoice_cli.lm.prompts import SpeechInput, turn_ids
    from glmvoice_cli.lm.text_tokenizer import END_OF_AUDIO

    ids = turn_ids(lm.text_tokenizer, SpeechInput(tuple(audio_ids)), system_mode)
    end = len(ids) - 1 - ids[::-1].index(lm.text_tokenizer.token_id(END_OF_AUDIO))
    return ids[:end]


@dataclass
class SpeculationStats:
    started: int = 0  # answers started at a pause
    confirmed: int = 0  # ... whose pause was the end of the turn (played)
    dropped: int = 0  # ... dropped because the user went on (or shed: see below)
    shed: int = 0  # ... dropped because other conversations' confirmed answers needed the worker


@dataclass
class Speculation:
    """A conversation's state before a speculative answer, to put back if the answer is dropped."""

    ids: list[int] = field(default_factory=list)
    system_mode: InputMode | None = None
    last_output_start: int | None = None
    last_prefill_tokens: int = 0
    stable: int = 0

    @classmethod
    def snapshot(cls, conv: Conversation) -> Speculation:
        return cls(list(conv.ids), conv.system_mode, conv.last_output_start, conv.last_prefill_tokens,
                   conv.stable)

    def restore(self, conv: Conversation) -> None:
        """The history exactly as it was. The cache is cropped at its next use to what still matches and was
        computed in the canonical chunks: the user's blocks prefilled while speaking stay, the rows of the
        answer's own prefill (a chunk of another shape) are computed again (`VoiceLM.PREFILL_CHUNK`)."""
        conv.ids[:] = self.ids
        conv.system_mode, conv.last_output_start = self.system_mode, self.last_output_start
        conv.last_prefill_tokens = self.last_prefill_tokens
        conv.stable = min(conv.stable, self.stable)
