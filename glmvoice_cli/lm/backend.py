"""The LM backend boundary: what the pipeline and the chat need from a language model.

Two backends implement it: `VoiceLM` (the in-process transformers loop, the default) and
`RemoteVoiceLM` (an OpenAI-compatible server such as vLLM, chosen with `--lm-url`). Both give the
same events for a turn (TextPiece, AudioTokens, then TurnEnd), stop within one token when the
cancel Event is set, and keep the history as token ids in a `Conversation` that the caller owns,
so barge-in trimming (`Conversation.keep_heard`) and resuming a saved session are backend-free.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from glmvoice_cli.lm.prompts import UserInput
    from glmvoice_cli.lm.text_tokenizer import TextTokenizer
    from glmvoice_cli.lm.voice_lm import Conversation, GenerationOptions, LMEvent
    from glmvoice_cli.options import LoadOptions


class LMBackend(Protocol):
    """A GLM-4-Voice language model that answers turns as streams of events."""

    text_tokenizer: TextTokenizer
    waits_on_network: bool  # True: the next event may take a network round trip (the caller runs it apart)

    def new_conversation(self) -> Conversation: ...

    def stream(self, conv: Conversation, user: UserInput, options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[LMEvent]: ...

    def stream_ids(self, conv: Conversation, new_ids: list[int], options: GenerationOptions | None = None,
                   cancel: threading.Event | None = None) -> Iterator[LMEvent]: ...

    def warm(self, conv: Conversation, ids: list[int]) -> int:
        """Compute the cache for `conv.ids + ids` ahead of the turn (history unchanged); the ids computed
        (0 where the backend has no cache of its own to fill, as a remote server)."""
        ...

    def prepare_thread(self) -> None:
        """Get the calling thread ready to run turns (the in-process LM records its CUDA graphs)."""
        ...

    def ensure_slots(self, n: int) -> None:
        """Keep the caches of at least `n` conversations at once (the compiled LM's static slots)."""
        ...

    def release(self, conv: Conversation) -> None:
        """`conv` has ended: free what the backend holds for it (its cache); its history ids stay."""
        ...


def load_lm_backend(folder: Path, options: LoadOptions) -> LMBackend:
    """The remote backend when `options.lm_server` is set (only config and tokenizer are read from
    `folder`), else the in-process model loaded from `folder`."""
    if options.lm_server is not None:
        from glmvoice_cli.lm.remote import RemoteVoiceLM

        return RemoteVoiceLM.connect(folder, options.lm_server)
    from glmvoice_cli.lm.voice_lm import VoiceLM

    return VoiceLM.from_folder(folder, options)
