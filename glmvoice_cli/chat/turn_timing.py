"""Where a turn's time goes: every mark in seconds from the end of the user's voice, and their p50/p90.

The chain of one spoken turn, in order (a mark is None when the turn never got there):

    end of voice (last voiced frame) -> end of turn confirmed (the silence) -> last block tokenized
    -> turn tokenized -> prefill done -> first text token -> first audio token -> first audio block
    decoded -> first sample written to the output

Marks reached before the end of voice or of the turn (blocks tokenized while speaking, a speculative
answer started at a pause) are negative or smaller than the confirmation: that is the point.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from glmvoice_cli.events import TurnTimings

if TYPE_CHECKING:
    from glmvoice_cli.chat.jobs import Job

# (field, short label) in the order of the chain above, for the compact line and the summary
STAGES: tuple[tuple[str, str], ...] = (
    ("turn_confirmed_s", "turn"),
    ("last_block_s", "block"),
    ("tokenized_s", "tok"),
    ("prefill_s", "prefill"),
    ("first_text_s", "text"),
    ("first_audio_token_s", "audio tok"),
    ("first_audio_s", "decoded"),
    ("first_sample_s", "play"),
)


def breakdown(respond: TurnTimings, *, origin: float, confirmed: float, respond_start: float,
              last_block: float | None, tokenized: float | None, prefilled: float | None,
              written: float | None) -> TurnTimings:
    """The chat's timings of a turn: respond's own (from its start) and the engine's perf_counter marks,
    all moved to seconds from `origin` (the end of voice)."""

    def since(t: float | None) -> float | None:
        return None if t is None else t - origin

    def shifted(rel: float | None) -> float | None:
        return None if rel is None else respond_start + rel - origin

    return replace(
        respond,
        first_token_s=shifted(respond.first_token_s), first_audio_s=shifted(respond.first_audio_s),
        first_text_s=shifted(respond.first_text_s), first_audio_token_s=shifted(respond.first_audio_token_s),
        turn_confirmed_s=since(confirmed), last_block_s=since(last_block), tokenized_s=since(tokenized),
        prefill_s=since(prefilled), first_sample_s=since(written),
    )


def on_input_clock(respond: TurnTimings, job: Job, sample_rate: int, written: bool) -> TurnTimings:
    """A lockstep turn's timings on the virtual clock (`--input-file` without `--realtime`): the model's work
    takes no time there, so every mark after the confirmation of the turn is that moment; only the turn-taking
    delay (end of voice -> confirmed) is measured. The real-time factor stays the wall clock's."""
    if job.voice_end_sample is None or job.confirmed_sample is None:  # a typed turn: nothing to measure from
        return replace(respond, first_token_s=None, first_audio_s=None, first_text_s=None, first_audio_token_s=None)
    at = (job.confirmed_sample - job.voice_end_sample) / sample_rate

    def reached(value: float | None) -> float | None:
        return None if value is None else at

    return replace(
        respond, turn_confirmed_s=at, tokenized_s=at, prefill_s=at, first_token_s=reached(respond.first_token_s),
        first_text_s=reached(respond.first_text_s), first_audio_token_s=reached(respond.first_audio_token_s),
        first_audio_s=reached(respond.first_audio_s), first_sample_s=at if written else None)


def compact_line(timings: TurnTimings) -> str:
    """One line: each reached mark as label +seconds, e.g. `turn +0.70 · tok +0.71 · ... · play +1.20`."""
    parts = [f"{label} {getattr(timings, name):+.2f}" for name, label in STAGES
             if getattr(timings, name) is not None]
    return " · ".join(parts)


def summary(turns: list[TurnTimings]) -> list[tuple[str, float, float, int]]:
    """(label, p50, p90, turns) for every mark at least one turn reached, in chain order."""
    rows = []
    for name, label in STAGES:
        values = [getattr(t, name) for t in turns if getattr(t, name) is not None]
        if values:
            p50, p90 = np.percentile(values, [50, 90])
            rows.append((label, float(p50), float(p90), len(values)))
    return rows


def summary_text(turns: list[TurnTimings]) -> str:
    """The end-of-chat summary: one line per mark, seconds from the end of voice."""
    rows = summary(turns)
    if not rows:
        return ""
    lines = [f"latency over {len(turns)} turns (s from the end of voice)   p50    p90"]
    lines += [f"  {label:<12} {p50:+7.2f} {p90:+7.2f}  ({n} turns)" for label, p50, p90, n in rows]
    return "\n".join(lines)
