"""glmvoice: a local, streaming voice assistant around GLM-4-Voice.

The public Python API is importable from here (`from glmvoice_cli import Assistant, LoadOptions`).
Importing this package stays cheap: each name is imported on first use (PEP 562), so torch,
transformers and sounddevice are only loaded by the modules that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it; the data flow order: loading, the pipeline, its inputs, its events.
_PUBLIC: dict[str, str] = {
    "LoadOptions": "glmvoice_cli.options",
    "Assistant": "glmvoice_cli.pipeline.assistant",
    "GenerationOptions": "glmvoice_cli.lm.voice_lm",
    "Conversation": "glmvoice_cli.lm.voice_lm",
    "StopReason": "glmvoice_cli.lm.voice_lm",
    "SpeechInput": "glmvoice_cli.lm.prompts",
    "TextInput": "glmvoice_cli.lm.prompts",
    "ChatEngine": "glmvoice_cli.chat.engine",
    "EngineConfig": "glmvoice_cli.chat.engine",
    "ConversationCore": "glmvoice_cli.chat.core",
    "TurnSettings": "glmvoice_cli.chat.core",
    "ModelWorker": "glmvoice_cli.chat.worker",
    "ChatState": "glmvoice_cli.events",
    "TurnTimings": "glmvoice_cli.events",
    "UserTurnStarted": "glmvoice_cli.events",
    "UserUtterance": "glmvoice_cli.events",
    "UserAudio": "glmvoice_cli.events",
    "AssistantTurn": "glmvoice_cli.events",
    "TextDelta": "glmvoice_cli.events",
    "AudioChunk": "glmvoice_cli.events",
    "Interrupted": "glmvoice_cli.events",
    "TurnEnded": "glmvoice_cli.events",
    "Failed": "glmvoice_cli.events",
    "StatusChanged": "glmvoice_cli.events",
}

__all__ = [
    "Assistant",
    "AssistantTurn",
    "AudioChunk",
    "ChatEngine",
    "ChatState",
    "Conversation",
    "ConversationCore",
    "EngineConfig",
    "Failed",
    "GenerationOptions",
    "Interrupted",
    "LoadOptions",
    "ModelWorker",
    "SpeechInput",
    "StatusChanged",
    "StopReason",
    "TextDelta",
    "TextInput",
    "TurnEnded",
    "TurnSettings",
    "TurnTimings",
    "UserAudio",
    "UserTurnStarted",
    "UserUtterance",
    "__version__",
]

if TYPE_CHECKING:
    from glmvoice_cli.chat.core import ConversationCore, TurnSettings
    from glmvoice_cli.chat.engine import ChatEngine, EngineConfig
    from glmvoice_cli.chat.worker import ModelWorker
    from glmvoice_cli.events import (
        AssistantTurn,
        AudioChunk,
        ChatState,
        Failed,
        Interrupted,
        StatusChanged,
        TextDelta,
        TurnEnded,
        TurnTimings,
        UserAudio,
        UserTurnStarted,
        UserUtterance,
    )
    from glmvoice_cli.lm.prompts import SpeechInput, TextInput
    from glmvoice_cli.lm.voice_lm import Conversation, GenerationOptions, StopReason
    from glmvoice_cli.options import LoadOptions
    from glmvoice_cli.pipeline.assistant import Assistant


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'glmvoice_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
