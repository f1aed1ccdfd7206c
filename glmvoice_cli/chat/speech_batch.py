"""The speech batchers (`pipeline.speech_batch`) as tasks of the model worker, one per worker and model.

Each yields `WAIT` while no block is handed in or while it holds the batch for a close stream, and runs the
batch as one unit when its most urgent row's turn comes (its priority is that row's).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from glmvoice_cli.chat.worker import READY, WAIT
from glmvoice_cli.pipeline.speech_batch import Batcher, DecoderBatcher, TokenizerBatcher

if TYPE_CHECKING:
    from glmvoice_cli.chat.worker import ModelWorker
    from glmvoice_cli.pipeline.assistant import Assistant


class BatcherTask:
    """A `WorkerTask` running one batcher."""

    def __init__(self, batcher: Batcher[Any]) -> None:
        self.batcher = batcher

    def steps(self) -> Generator[str, None, None]:
        while True:
            if not self.batcher.waiting or self.batcher.hold():
                yield WAIT
                continue
            self.batcher.run()
            yield READY

    def priority(self) -> tuple[float, ...]:
        return self.batcher.priority()

    def crashed(self, error: BaseException) -> None:
        self.batcher.fail_all(error)


def batcher_for(worker: ModelWorker, assistant: Assistant) -> DecoderBatcher | None:
    """The worker's batcher for the assistant's decoder (made and added on first use); None without one."""
    decoder = assistant.decoder
    if decoder is None:
        return None
    batcher = _shared(worker, decoder, lambda: DecoderBatcher(decoder, worker.wake))
    assert isinstance(batcher, DecoderBatcher)
    return batcher


def tokenizer_batcher_for(worker: ModelWorker, assistant: Assistant) -> TokenizerBatcher | None:
    """The worker's batcher for the assistant's speech tokenizer (made and added on first use); None without."""
    tokenizer = assistant.speech_tokenizer
    if tokenizer is None:
        return None
    batcher = _shared(worker, tokenizer, lambda: TokenizerBatcher(tokenizer.model, worker.wake))
    assert isinstance(batcher, TokenizerBatcher)
    return batcher


def _shared(worker: ModelWorker, model: object, make: Callable[[], Batcher[Any]]) -> Batcher[Any]:
    """One batcher task per worker and model."""
    return worker.shared(("speech-batch", id(model)), lambda: BatcherTask(make())).batcher
