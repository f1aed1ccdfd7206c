"""Keep a conversation inside the model's context (`seq_length`, the RoPE range it was trained on).

The reference never trims: a long chat runs past `seq_length` into positions the model never saw.
We drop whole past turns, oldest first, always keeping the system prompt, until the history, the new
turn and room for the answer fit. The room kept is the answer's token budget, capped at half the
context; an answer that then reaches `seq_length` stops there (StopReason.CONTEXT).

`plan_context` is pure (lists of ids in, a plan out) so every LM backend, in-process or remote, calls
the same function before it sends a turn to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from glmvoice_cli.errors import ContextLengthError


@dataclass(frozen=True)
class ContextPlan:
    """What to run for one turn so that it fits in the context."""

    history: list[int]  # the past to keep: system prompt + the most recent whole turns
    dropped_turns: int  # whole past turns removed from the front (0: nothing dropped)
    dropped_tokens: int
    max_answer_tokens: int  # steps the answer may take: min(max_new_tokens, what is left of the context)
    context_limited: bool  # the context, not max_new_tokens, bounds the answer (reaching it: StopReason.CONTEXT)


def answer_room(max_new_tokens: int, seq_length: int) -> int:
    """Tokens kept free for the answer: its budget, capped at half the context."""
    return max(1, min(max_new_tokens, seq_length // 2))


def turn_starts(history: Sequence[int], user_id: int) -> list[int]:
    """Positions of every `<|user|>` in the history: each starts one past turn (the answer follows it)."""
    return [i for i, token in enumerate(history) if token == user_id]


def plan_context(
    history: Sequence[int], new_ids: Sequence[int], *, user_id: int, seq_length: int, max_new_tokens: int
) -> ContextPlan:
    """Drop the oldest whole turns from `history` until `history + new_ids` leaves room for the answer.

    `history` is the committed id history (system prompt, then turns each starting with `<|user|>`);
    `new_ids` the turn about to run. Raises ContextLengthError when the new turn alone (with the system
    prompt) leaves no room for the answer.
    """
    room = answer_room(max_new_tokens, seq_length)
    starts = turn_starts(history, user_id)
    system_end = starts[0] if starts else len(history)
    need = len(new_ids) + room
    kept_from = next((s for s in starts if system_end + len(history) - s + need <= seq_length), None)
    if len(history) + need <= seq_length:
        kept = list(history)
    elif kept_from is not None:
        kept = [*history[:system_end], *history[kept_from:]]
    elif system_end + need <= seq_length:
        kept = list(history[:system_end])
    else:
        raise ContextLengthError(
            f"this turn is {len(new_ids)} tokens; the model's context holds {seq_length}, "
            f"{system_end} of them taken by the system prompt and {room} kept for the answer: shorten it"
        )
    dropped = len(history) - len(kept)
    dropped_turns = sum(1 for s in starts if s < system_end + dropped)
    left = seq_length - len(kept) - len(new_ids)
    return ContextPlan(
        history=kept, dropped_turns=dropped_turns, dropped_tokens=dropped,
        max_answer_tokens=min(max_new_tokens, left), context_limited=left < max_new_tokens,
    )


def min_tokens_for_bytes(n_bytes: int, max_token_bytes: int) -> int:
    """A lower bound on the tokens a text of `n_bytes` UTF-8 bytes encodes to (checked before encoding)."""
    return -(-n_bytes // max(1, max_token_bytes))
