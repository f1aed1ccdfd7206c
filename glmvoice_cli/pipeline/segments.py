"""Where a file's speech is: the stretches `transcribe` hands to the model one by one, with their times.

The VAD (the chat's own segmenter) finds each utterance; each becomes one segment, so a subtitle line is a
sentence or a breath group rather than a fixed 30 s slice cut mid-word. Segment edges sit on the speech
tokenizer's 12.5 Hz clock (80 ms), so the times printed are the times of the tokens the model heard. An
utterance longer than a window is cut into window-long pieces. A file in which the VAD finds no speech at all
(music, noise it rejects) is cut into plain windows instead, so every file still gets a transcript.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glmvoice_cli.audio.vad import Segmenter, Utterance, VadConfig
from glmvoice_cli.config import SAMPLE_RATE_IN, TOKENS_PER_SECOND

TOKEN_SAMPLES = round(SAMPLE_RATE_IN / TOKENS_PER_SECOND)  # 1280 samples: one speech token (80 ms)
# Transcription wants every word, not quick turns: the least aggressive VAD mode keeps quiet speech, and a
# half-second pause (a sentence break, not a breath) separates segments.
TRANSCRIBE_VAD = VadConfig(aggressiveness=1, hangover_ms=500)


@dataclass(frozen=True)
class Segment:
    """One stretch of a file's 16 kHz samples: [start, end), on token boundaries (the end may be the file's)."""

    start: int
    end: int

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE_IN

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE_IN


def _token_floor(sample: int) -> int:
    return sample // TOKEN_SAMPLES * TOKEN_SAMPLES


def _token_ceil(sample: int) -> int:
    return -(-sample // TOKEN_SAMPLES) * TOKEN_SAMPLES


def window_samples(window_s: float) -> int:
    """A window of `window_s` seconds, in whole tokens (at least one)."""
    return max(TOKEN_SAMPLES, _token_floor(int(window_s * SAMPLE_RATE_IN)))


def fixed_windows(total: int, window: int) -> list[Segment]:
    """[0, total) in consecutive pieces of `window` samples (one empty segment for an empty file)."""
    return [Segment(i, min(i + window, total)) for i in range(0, total, window)] or [Segment(0, total)]


def speech_segments(samples: np.ndarray, window_s: float, vad: VadConfig = TRANSCRIBE_VAD) -> list[Segment]:
    """The segments of 16 kHz mono `samples`: one per utterance (cut at `window_s`), in order, never overlapping."""
    total, window = len(samples), window_samples(window_s)
    config = VadConfig(**{**vad.__dict__, "max_turn_s": max(window / SAMPLE_RATE_IN,
                                                             vad.frame_ms * (vad.start_frames + 1) / 1000)})
    segmenter = Segmenter(config)
    events = segmenter.push(samples) + segmenter.finish()
    utterances = [e for e in events if isinstance(e, Utterance)]
    if not utterances:
        return fixed_windows(total, window)
    segments: list[Segment] = []
    continued = False  # the previous utterance was cut at the window length: this one goes on from its end
    for utterance in utterances:
        previous_end = segments[-1].end if segments else 0
        start = previous_end if continued else max(_token_floor(utterance.start_sample), previous_end)
        end = min(_token_ceil(utterance.end_sample), total)
        if utterance.truncated:
            end = min(end, start + window)  # what the rounding pushes past the window opens the next piece
        for piece in range(start, end, window):
            segments.append(Segment(piece, min(piece + window, end)))
        continued = utterance.truncated
    return segments
