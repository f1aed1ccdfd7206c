"""What a conversation is set up with (`EngineConfig`) and what may change mid-conversation (`TurnSettings`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from glmvoice_cli.audio.end_of_turn import TurnEndConfig
from glmvoice_cli.audio.vad import VadConfig
from glmvoice_cli.config import SPECULATIVE_PAUSE_MS
from glmvoice_cli.errors import UsageError

if TYPE_CHECKING:
    from glmvoice_cli.audio.end_of_turn import JudgeThread
    from glmvoice_cli.pipeline import GenerationOptions

TURN_TRANSCRIPT_MAX_TOKENS = 100  # --transcribe-user: text tokens for one spoken turn, which is short


@dataclass(frozen=True)
class EngineConfig:
    vad: VadConfig = field(default_factory=VadConfig)
    generation: GenerationOptions | None = None  # None: the LM's defaults
    lockstep: bool = False  # see the module docstring (needs a VirtualClock)
    barge_in: bool = True  # False: the user's speech while the assistant answers waits its turn
    transcribe_user: bool = False  # a text-only LM pass before each answer (costs latency) fills the user's text
    transcribe_max_new_tokens: int = TURN_TRANSCRIPT_MAX_TOKENS
    streaming: bool = True  # tokenize each completed block and prefill it while the user speaks
    speculative_pause_ms: int | None = SPECULATIVE_PAUSE_MS  # start answering (unheard) at this pause
    # how the end of a turn is decided: silence, or the smart detector at the pause (needs a `turn_judge`)
    turn_end: TurnEndConfig = field(default_factory=TurnEndConfig)
    # decoder blocks of all the worker's conversations decoded together (`chat.speech_batch`); False decodes
    # each at once on its own
    batch_speech: bool = True


def check_turn_end(config: TurnEndConfig, judge: JudgeThread | None) -> None:
    """The smart detector needs a judge: a one-line error naming the download otherwise."""
    if config.smart and judge is None:
        raise UsageError("the smart turn detector needs its model (glmvoice models download turn)")


@dataclass(frozen=True)
class TurnSettings:
    """What `update()` may change mid-conversation (None: keep the current value)."""

    vad: VadConfig | None = None
    barge_in: bool | None = None
    speculative_pause_ms: int | None = None  # 0 turns speculation off
    turn_end: TurnEndConfig | None = None
    generation: GenerationOptions | None = None  # sampling and length of the next answers
