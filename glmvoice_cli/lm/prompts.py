"""GLM-4-Voice chat prompts, built directly as token ids.

The official web demo builds one string per turn,
``<|system|>\\n{system}<|user|>\\n{user}<|assistant|>streaming_transcription\\n`` (the system part only
on the first turn), and tokenizes it with ``[gMASK]<sop>`` in front. For the next turn it decodes the
answer to text, strips it and re-tokenizes the whole history, which can split text differently from
what the model generated. We keep the history as the exact token ids instead, so the KV cache of the
previous turns stays valid and a new turn only prefills its own input.

Special tokens are never parsed out of user text: a typed ``<|user|>`` stays plain text.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from glmvoice_cli.lm.text_tokenizer import (
    ASSISTANT,
    BEGIN_OF_AUDIO,
    END_OF_AUDIO,
    SYSTEM,
    USER,
    TextTokenizer,
)

# The two official system prompts, verbatim (the speech one ends with a space). Other prompts mostly fail.
SPEECH_SYSTEM_PROMPT = (
    "User will provide you with a speech instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens. "
)
TEXT_SYSTEM_PROMPT = (
    "User will provide you with a text instruction. Do it step by step. First, think about the "
    "instruction and respond in a interleaved manner, with 13 text token followed by 26 audio tokens."
)
ASSISTANT_MODE = "streaming_transcription\n"  # follows <|assistant|>: ask for interleaved text+audio


class InputMode(str, Enum):
    """How the user speaks to the model; the first turn's mode picks the system prompt."""

    SPEECH = "speech"
    TEXT = "text"


@dataclass(frozen=True)
class SpeechInput:
    """A spoken turn: speech-tokenizer indices in [0, n_audio_tokens).

    `instruction`, when set, is a text instruction placed before the speech in the same user turn
    (how `transcribe` asks for a transcript); a spoken chat turn has none.
    """

    audio_tokens: tuple[int, ...]
    instruction: str | None = None

    @property
    def mode(self) -> InputMode:
        return InputMode.SPEECH


@dataclass(frozen=True)
class TextInput:
    """A typed turn."""

    text: str

    @property
    def mode(self) -> InputMode:
        return InputMode.TEXT


UserInput = SpeechInput | TextInput


def system_prompt(mode: InputMode) -> str:
    return SPEECH_SYSTEM_PROMPT if mode is InputMode.SPEECH else TEXT_SYSTEM_PROMPT


def system_ids(tokenizer: TextTokenizer, mode: InputMode) -> list[int]:
    """``<|system|>\\n{system prompt}``."""
    return [tokenizer.token_id(SYSTEM), *tokenizer.encode("\n" + system_prompt(mode))]


def user_turn_ids(tokenizer: TextTokenizer, user: UserInput) -> list[int]:
    """``<|user|>\\n{content}<|assistant|>streaming_transcription\\n``.

    Text between special tokens is encoded segment by segment, as the official tokenizer does.
    """
    ids = [tokenizer.token_id(USER)]
    if isinstance(user, SpeechInput):
        ids += tokenizer.encode("\n" + (user.instruction or ""))
        ids += [tokenizer.token_id(BEGIN_OF_AUDIO), *tokenizer.audio_ids(list(user.audio_tokens))]
        ids.append(tokenizer.token_id(END_OF_AUDIO))
    else:
        ids += tokenizer.encode("\n" + user.text)
    ids.append(tokenizer.token_id(ASSISTANT))
    ids += tokenizer.encode(ASSISTANT_MODE)
    return ids


def turn_ids(tokenizer: TextTokenizer, user: UserInput, system_mode: InputMode | None) -> list[int]:
    """The ids a turn appends to the history.

    `system_mode` is None for the first turn of a conversation: then the prompt starts with
    ``[gMASK]<sop>`` and the system prompt of the user's input mode. Later turns (spoken or typed)
    add only the user part, so a typed turn in a spoken conversation keeps the speech system prompt.
    """
    if system_mode is not None:
        return user_turn_ids(tokenizer, user)
    return [*tokenizer.prefix_ids, *system_ids(tokenizer, user.mode), *user_turn_ids(tokenizer, user)]
