"""Speech to text with the chat model: the speech input plus a text instruction, audio ids masked.

The audio is cut into segments where the VAD finds speech (one per utterance, at most one window long: 30 s
by default, the tokenizer's own window, which fits the language model's context; see `segments`); every
segment is a fresh one-turn conversation, greedy, text only, and keeps its times for subtitles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from glmvoice_cli.config import SAMPLE_RATE_IN, WINDOW_SECONDS
from glmvoice_cli.lm.prompts import SpeechInput
from glmvoice_cli.lm.voice_lm import GenerationOptions, TextPiece
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.pipeline.segments import Segment, speech_segments

TRANSCRIBE_INSTRUCTION = (
    "Transcribe the speech below exactly, word for word, in the language it is spoken in. "
    "Reply with the transcript only."
)
WINDOW_TRANSCRIPT_MAX_TOKENS = 300  # text tokens per window: 30 s of fast speech is about 100 words


@dataclass(frozen=True)
class TranscriptSegment:
    """What was said between two times of the file (seconds, on the 80 ms token clock)."""

    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    seconds: float  # of audio
    speech_tokens: int
    generated_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # tokenize_s, generate_s
    segments: tuple[TranscriptSegment, ...] = ()  # in order; those with no words are left out


def transcribe(assistant: Assistant, samples: np.ndarray, *, prompt: str | None = None,
               window_s: float = WINDOW_SECONDS, max_new_tokens: int = WINDOW_TRANSCRIPT_MAX_TOKENS,
               on_window: Callable[[int, int], None] | None = None, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None) -> Transcript:
    """Transcribe 16 kHz mono `samples` (greedy unless a temperature is given; `seed` makes a sampled one
    repeatable); `on_window(done, total)` reports progress, one step per segment."""
    if assistant.speech_tokenizer is None:
        raise RuntimeError("transcription needs the speech tokenizer")
    segments: list[Segment] = speech_segments(samples, window_s)
    start = time.perf_counter()
    token_windows = assistant.speech_tokenizer.encode([samples[seg.start : seg.end] for seg in segments])
    tokenize_s = time.perf_counter() - start
    options = GenerationOptions(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, text_only=True,
                                seed=seed)
    said: list[TranscriptSegment] = []
    generated = 0
    start = time.perf_counter()
    for done, (segment, tokens) in enumerate(zip(segments, token_windows, strict=True), 1):
        conv = assistant.lm.new_conversation()
        user = SpeechInput(tuple(tokens), instruction=prompt or TRANSCRIBE_INSTRUCTION)
        pieces = [e.text for e in assistant.lm.stream(conv, user, options) if isinstance(e, TextPiece)]
        generated += len(conv.last_output)
        text = "".join(pieces).strip()
        if text:
            said.append(TranscriptSegment(round(segment.start_s, 3), round(segment.end_s, 3), text))
        if on_window:
            on_window(done, len(segments))
    return Transcript(text=" ".join(s.text for s in said), seconds=len(samples) / SAMPLE_RATE_IN,
                      speech_tokens=sum(map(len, token_windows)), generated_tokens=generated,
                      timings={"tokenize_s": round(tokenize_s, 3),
                               "generate_s": round(time.perf_counter() - start, 3)},
                      segments=tuple(said))
