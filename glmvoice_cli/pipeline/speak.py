"""Text to speech with the chat model itself: GLM-4-Voice speaks a text when instructed to.

The text is split at sentence boundaries; each piece is a fresh text turn carrying the speaking
instruction (see `instructions.py`), and the pieces' events are yielded in order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

from glmvoice_cli.events import AudioChunk, TextDelta, TurnEnded
from glmvoice_cli.lm.prompts import TextInput
from glmvoice_cli.lm.voice_lm import GenerationOptions
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.pipeline.instructions import SpeakingStyle, build_instruction, split_sentences

MAX_PIECE_CHARS = 200  # characters per spoken piece: long enough for prosody, short enough to start soon
TTS_MAX_NEW_TOKENS = 1200  # per piece: ~200 characters of interleaved text and speech, with room to spare

log = logging.getLogger(__name__)


def speak(assistant: Assistant, text: str, style: SpeakingStyle | None = None, template: str | None = None,
          options: GenerationOptions | None = None, cancel: threading.Event | None = None,
          ) -> Iterator[TextDelta | AudioChunk | TurnEnded]:
    """Events of the spoken `text`, piece after piece; stops early when `cancel` is set."""
    options = options or GenerationOptions(max_new_tokens=TTS_MAX_NEW_TOKENS)
    style = style or SpeakingStyle()
    for index, piece in enumerate(split_sentences(text, MAX_PIECE_CHARS)):
        if cancel is not None and cancel.is_set():
            return
        if index:
            yield TextDelta(" ")
        seed = None if options.seed is None else options.seed + index
        conv = assistant.lm.new_conversation()
        user = TextInput(build_instruction(piece, style, template))
        log.debug("piece %d: instruction sent to the model: %r", index + 1, user.text)
        start = time.perf_counter()
        for event in assistant.respond(conv, user, replace(options, seed=seed), cancel):
            if isinstance(event, TurnEnded):
                t = event.timings
                log.debug("piece %d: prompt %d tokens, %d generated; first token %s s, first audio %s s, "
                          "RTF %s, %.2f s in all", index + 1, conv.last_output_start or 0, t.tokens,
                          _s(t.first_token_s), _s(t.first_audio_s), _s(t.real_time_factor),
                          time.perf_counter() - start)
            yield event


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"
