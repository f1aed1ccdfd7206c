"""Speech to text with the chat model: the speech input plus a text instruction, audio ids masked.

Long audio is cut into windows (30 s by default, the tokenizer's own window) that each fit the
language model's context; every window is a fresh one-turn conversation, greedy, text only.
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

TRANSCRIBE_INSTRUCTION = (
    "Transcribe the speech below exactly, word for word, in the language it is spoken in. "
    "Reply with the transcript only."
)
WINDOW_TRANSCRIPT_MAX_TOKENS = 300  # text tokens per window: 30 s of fast speech is about 100 words


@dataclass(frozen=True)
class Transcript:
    text: str
    seconds: float  # of audio
    speech_tokens: int
    generated_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # tokenize_s, generate_s


def transcribe(assistant: Assistant, samples: np.ndarray, *, prompt: str | None = None,
               window_s: float = WINDOW_SECONDS, max_new_tokens: int = WINDOW_TRANSCRIPT_MAX_TOKENS,
               on_window: Callable[[int, int], None] | None = None, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None) -> Transcript:
    """Transcribe 16 kHz mono `samples` (greedy unless a temperature is given; `seed` makes a sampled one
    repeatable); `on_window(done, total)` reports progress."""
    if assistant.speech_tokenizer is None:
        raise RuntimeError("transcription needs the speech tokenizer")
    step = max(1, int(window_s * SAMPLE_RATE_IN))
    windows = [samples[i : i + step] for i in range(0, len(samples), step)] or [samples]
    start = time.perf_counter()
    token_windows = assistant.speech_tokenizer.encode(windows)
    tokenize_s = time.perf_counter() - start
    options = GenerationOptions(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, text_only=True,
                                seed=seed)
    texts, generated = [], 0
    start = time.perf_counter()
    for done, tokens in enumerate(token_windows, 1):
        conv = assistant.lm.new_conversation()
        user = SpeechInput(tuple(tokens), instruction=prompt or TRANSCRIBE_INSTRUCTION)
        pieces = [e.text for e in assistant.lm.stream(conv, user, options) if isinstance(e, TextPiece)]
        generated += len(conv.last_output)
        texts.append("".join(pieces).strip())
        if on_window:
            on_window(done, len(token_windows))
    return Transcript(text=" ".join(t for t in texts if t), seconds=len(samples) / SAMPLE_RATE_IN,
                      speech_tokens=sum(map(len, token_windows)), generated_tokens=generated,
                      timings={"tokenize_s": round(tokenize_s, 3),
                               "generate_s": round(time.perf_counter() - start, 3)})
