"""The conversation history as the user heard it: barge-in trimming and resuming a saved session.

The language model's history must hold only what the user actually heard. When an answer is cut,
the played sample count becomes seconds of audio, then speech tokens (12.5 per second), then a
history length through `tokens_through_audio`; `Conversation.keep_heard` drops the rest (and the
matching KV cache). A resumed session rebuilds the history from the token ids each saved turn kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from glmvoice_cli.config import TOKENS_PER_SECOND

if TYPE_CHECKING:
    from glmvoice_cli.lm.backend import LMBackend
    from glmvoice_cli.lm.text_tokenizer import TextTokenizer
    from glmvoice_cli.lm.voice_lm import Conversation
    from glmvoice_cli.sessions.store import TurnRecord

HEARD_EPSILON_TOKENS = 1e-6  # float slack so an exactly played token is not rounded up to the next


def audio_tokens_heard(played_samples: int, sample_rate: int) -> int:
    """Speech tokens whose audio has started playing: a token heard in part counts as said."""
    if played_samples <= 0:
        return 0
    return math.ceil(played_samples / sample_rate * TOKENS_PER_SECOND - HEARD_EPSILON_TOKENS)


def trim_to_heard(conv: Conversation, tokenizer: TextTokenizer, played_samples: int, sample_rate: int) -> int:
    """Cut the last answer of `conv` after the last audio token played; returns the answer tokens kept.

    Runs torch (the cache crop): call it from the model thread only.
    """
    from glmvoice_cli.lm.voice_lm import tokens_through_audio

    output = conv.last_output
    n_audio = audio_tokens_heard(played_samples, sample_rate)
    keep = tokens_through_audio(output, tokenizer, n_audio)
    conv.keep_heard(keep)
    return keep


@dataclass(frozen=True)
class LastTurn:
    """Where the conversation's last turn sits in its history (for the conversation core's reports)."""

    user_ids: list[int]  # the user's part of the history, as the LM took it
    answer_ids: list[int]  # the answer so far (what the history keeps of it)
    answer_start: int | None  # where the answer begins in the history
    prefilled_at: float | None  # perf_counter when the turn's prefill was done
    prefill_tokens: int  # ids the prefill ran through the model


def last_turn(conv: Conversation) -> LastTurn:
    start, end = conv.last_input_start, conv.last_output_start
    user = conv.ids[start:end] if start is not None else []
    return LastTurn(user, conv.last_output, end, conv.prefilled_at, conv.last_prefill_tokens)


def trim_finished_answer(conv: Conversation, tokenizer: TextTokenizer, answer_start: int, played_samples: int,
                         sample_rate: int) -> bool:
    """`truncate` after the fact: trim the answer that began at `answer_start` to what was heard, if it is
    still the last answer (later turns were built on it otherwise) and more of it was said than heard."""
    if conv.last_output_start != answer_start:
        return False
    said = sum(1 for i in conv.last_output if tokenizer.is_audio(i))
    if audio_tokens_heard(played_samples, sample_rate) >= said:
        return False
    trim_to_heard(conv, tokenizer, played_samples, sample_rate)
    return True


def answer_text(tokenizer: TextTokenizer, ids: Sequence[int]) -> str:
    """The plain text of an answer's kept ids (audio and special tokens left out)."""
    words = [i for i in ids if not tokenizer.is_audio(i) and not tokenizer.is_special(i)]
    return tokenizer.decode(words).strip()


def restore_conversation(lm: LMBackend, records: Sequence[TurnRecord]) -> Conversation:
    """A conversation whose history is the ids the saved turns kept, in order (no cache yet).

    The system prompt of the first turn tells the input mode (spoken or typed) that later turns
    keep; the first new turn then prefills the whole history once.
    """
    from glmvoice_cli.lm.prompts import InputMode, system_ids

    conv = lm.new_conversation()
    for record in records:
        if record.role == "assistant":
            conv.last_output_start = len(conv.ids)
        conv.ids.extend(record.token_ids)
    if conv.ids:
        tok = lm.text_tokenizer
        for mode in (InputMode.SPEECH, InputMode.TEXT):
            head = [*tok.prefix_ids, *system_ids(tok, mode)]
            if conv.ids[: len(head)] == head:
                conv.system_mode = mode
                break
        else:
            conv.system_mode = InputMode.SPEECH  # a foreign history: later turns add only their user part
    _fit_context(lm, conv)
    return conv


def _fit_context(lm: LMBackend, conv: Conversation) -> None:
    """Drop the oldest whole turns of a restored history that leaves no room for a turn, as every turn does
    (`lm.context.plan_context`, keeping half the context free): the listener warms the history while the user
    speaks, and a history longer than the context would be recomputed, past the model's positions, at every
    block and pause."""
    from glmvoice_cli.errors import ContextLengthError
    from glmvoice_cli.lm.context import plan_context, turn_starts

    limit = getattr(lm, "context_length", None)
    user_id = getattr(lm, "user_id", None)
    if not conv.ids or not isinstance(limit, int) or not isinstance(user_id, int):
        return  # a server that states no limit decides itself
    try:
        plan = plan_context(conv.ids, [], user_id=user_id, seq_length=limit, max_new_tokens=limit)
    except ContextLengthError:
        return  # the system prompt alone fills it: the next turn says so in one line
    if plan.dropped_tokens:
        conv.ids[:] = plan.history
        conv.dropped_turns += plan.dropped_turns
        if conv.last_output_start is not None:  # the last answer, if it was kept, moved forward
            system_end = next(iter(turn_starts(plan.history, user_id)), len(plan.history))
            start = conv.last_output_start - plan.dropped_tokens
            conv.last_output_start = start if start >= system_end else None
