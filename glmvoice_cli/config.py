"""Named constants of the pipeline, with their units. Nothing here imports torch."""

from __future__ import annotations

SAMPLE_RATE_IN = 16_000  # Hz, what the speech tokenizer consumes
SAMPLE_RATE_OUT = 22_050  # Hz, what the speech decoder produces
TOKENS_PER_SECOND = 12.5  # speech tokens per second of audio (80 ms each)
WINDOW_SECONDS = 30.0  # the speech tokenizer encodes independent 30 s windows
WINDOW_TOKENS = round(WINDOW_SECONDS * TOKENS_PER_SECOND)  # 375 speech tokens in one full window
SPECULATIVE_PAUSE_MS = 200  # a pause this long starts the answer unheard; played only once the turn ends
