"""The stages composed, threadless: the only place above the stages that drives the LM and its history.

`Assistant` (assistant.py) runs a turn through tokenizer -> LM -> decoder; `listening` prefills a turn while
it is spoken, `history` trims an answer to what was heard and rebuilds a saved one; `speak`, `transcribe` and
`instructions` serve `tts` and `transcribe`. The conversation core (`chat/`) reaches the language model only
through here: the LM types it needs are named below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glmvoice_cli.lm.prompts import TextInput, UserInput
from glmvoice_cli.lm.voice_lm import Conversation, GenerationOptions, LMSlotsBusy
from glmvoice_cli.pipeline.assistant import PENDING, Assistant, Pending

__all__ = ["PENDING", "Assistant", "Conversation", "GenerationOptions", "LMSlotsBusy", "Pending", "TextInput",
           "UserInput"]

if TYPE_CHECKING:  # torch-backed: for annotations only
    from glmvoice_cli.decoder.noise import NoiseSource as NoiseSource
