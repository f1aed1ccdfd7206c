"""The speech stages' blocks of several conversations, computed together.

Each conversation hands its next block (a decoder block of its answer, a 4 s tokenizer block of what its
user is saying) to a batcher and waits; when the batcher runs (`chat.speech_batch` makes each one a task of
the model worker) it computes every block handed in so far in one batch: `SpeechDecoder.decode_blocks`
(one flow and one vocoder call per shape) or `encode_spans` (one encoder call per span length). N people
talking at once then cost about one block's time on a GPU instead of N. Rows are independent: each stream
keeps its noise and caches, and a barge-in in one drops its row only.

When to run: a batcher's priority is its most urgent row's (a confirmed answer whose speaker runs dry
first), so it runs when that row would have run alone. The decoder's batch waits for more rows only while
another stream is a few tokens short of its own block and every waiting row's speaker has audio queued for
longer than that wait plus the batch itself (`BatchPolicy`): it never holds a row whose speaker would run
dry first. The tokenizer's batch waits for nothing, but gives way to a conversation of the same priority
(another user's audio that completes a block at the same moment is handed in first).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from glmvoice_cli.decoder.speech_decoder import BlockRequest, DecoderState, SpeechDecoder
    from glmvoice_cli.tokenizer.block_encoder import Span, SpanResult
    from glmvoice_cli.tokenizer.whisper_vq import WhisperVQEncoder

Priority = Callable[[], tuple[float, ...]]
ANSWER_KIND = 0  # a priority's first element for a confirmed answer (chat.answer.KIND_ANSWER)
_Item = TypeVar("_Item")


@dataclass(frozen=True)
class BatchPolicy:
    """How long a decoder batch may wait for another stream's block (see the module docstring)."""

    join_tokens: int = 13  # a stream this many tokens (or fewer) short of its block is worth waiting for
    max_hold_s: float = 0.25  # never wait longer than this for it
    margin_s: float = 0.1  # audio a waiting row's speaker must keep beyond the wait and the batch


@dataclass(eq=False)  # tickets are told apart by identity (their items hold tensors)
class Ticket(Generic[_Item]):
    """A block handed to a batcher; `finished` once computed (or cut), `error` if computing it failed."""

    item: _Item
    priority: Priority
    result: object = None
    finished: bool = False
    error: BaseException | None = None


@dataclass
class BatchStats:
    """What a batcher did (benchmarks, tests)."""

    batches: list[int] = field(default_factory=list)  # rows per batch run
    holds: int = 0  # times it waited for another stream's block
    seconds: list[float] = field(default_factory=list)  # wall time per batch


class Batcher(Generic[_Item]):
    """Blocks handed in by conversations, computed together by `run` (see the module docstring).

    `wake` is called when a block is handed in and when a batch is done (the worker asks its waiting
    tasks again)."""

    def __init__(self, wake: Callable[[], None] = lambda: None) -> None:
        self.wake = wake
        self.stats = BatchStats()
        self._lock = threading.Lock()
        self._pending: list[Ticket[_Item]] = []
        self._batch_s = 0.0  # recent seconds per batch

    def _compute(self, items: list[_Item]) -> list[object]:
        """One batch: a result per item."""
        raise NotImplementedError

    def _skip(self, item: _Item) -> bool:
        """An item that needs no computing any more (its stream was cut)."""
        return False

    def hold(self) -> bool:
        """Wait for more rows instead of running now."""
        return False

    # ------------------------------------------------------------------ the conversations' side

    def submit(self, item: _Item, priority: Priority) -> Ticket[_Item]:
        ticket = Ticket(item, priority)
        with self._lock:
            self._pending.append(ticket)
        self.wake()
        return ticket

    def withdraw(self, ticket: Ticket[_Item]) -> None:
        """The conversation went away (dropped, stopped) before its block was computed: forget it."""
        with self._lock:
            if ticket in self._pending:
                self._pending.remove(ticket)

    def wait(self, item: _Item, priority: Priority) -> Generator[None, None, object]:
        """Hand `item` in and wait (yielding) until it is computed -> its result; a failure is raised."""
        ticket = self.submit(item, priority)
        try:
            while not ticket.finished:
                yield None
        finally:
            self.withdraw(ticket)
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    # ------------------------------------------------------------------ the runner's side

    @property
    def waiting(self) -> bool:
        """Blocks are handed in and not yet computed."""
        with self._lock:
            return bool(self._pending)

    def priority(self) -> tuple[float, ...]:
        """The most urgent waiting row's priority (the batch runs when that row would have run alone)."""
        with self._lock:
            tickets = list(self._pending)
        keys = []
        for ticket in tickets:
            try:
                keys.append(ticket.priority())
            except Exception:  # noqa: BLE001 - a conversation that went away must not stop the batch
                keys.append((float("inf"),))
        return min(keys, default=(float("inf"),))

    def fail_all(self, error: BaseException) -> None:
        """Every waiting conversation fails with `error` (the worker itself failed)."""
        with self._lock:
            tickets, self._pending = self._pending, []
        for ticket in tickets:
            ticket.error, ticket.finished = error, True
        self.wake()

    def run(self) -> None:
        """Compute every block handed in so far, in one batch."""
        with self._lock:
            tickets, self._pending = self._pending, []
        live = [t for t in tickets if not self._skip(t.item)]
        started = time.perf_counter()
        try:
            results = self._compute([t.item for t in live]) if live else []
        except Exception as e:  # noqa: BLE001 - each waiting conversation fails with it; the batcher goes on
            for ticket in live:
                ticket.error = e
        else:
            for ticket, result in zip(live, results, strict=True):
                ticket.result = result
        for ticket in tickets:
            ticket.finished = True
        if live:
            elapsed = time.perf_counter() - started
            self.stats.batches.append(len(live))
            self.stats.seconds.append(elapsed)
            self._batch_s = elapsed if not self._batch_s else 0.5 * (self._batch_s + elapsed)
        self.wake()  # the conversations waiting on these blocks go on


class DecoderBatcher(Batcher["BlockRequest"]):
    """Decoder blocks of several answers, decoded together; the batch may wait for a close stream."""

    def __init__(self, decoder: SpeechDecoder, wake: Callable[[], None] = lambda: None,
                 policy: BatchPolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(wake)
        self.decoder = decoder
        self.policy = policy or BatchPolicy()
        self._clock = clock
        self._streams: dict[int, DecoderState] = {}  # answers decoding now: who might join a batch
        self._held_since: float | None = None

    def track(self, state: DecoderState) -> None:
        """An answer started decoding: its next block may be worth waiting for."""
        with self._lock:
            self._streams[id(state)] = state

    def untrack(self, state: DecoderState) -> None:
        with self._lock:
            self._streams.pop(id(state), None)

    def _skip(self, item: BlockRequest) -> bool:
        if item.is_cut():  # cut before its turn: nothing to compute, the stream is spent
            item.cut = item.state.cancelled = True
        return item.cut

    def _compute(self, items: list[BlockRequest]) -> list[object]:
        self._held_since = None
        self.decoder.decode_blocks(items)
        return [item.output for item in items]

    def hold(self) -> bool:
        """Wait for another stream's block instead of running now? Only while it is close and no waiting row's
        speaker needs more (see `BatchPolicy`)."""
        policy, now = self.policy, self._clock()
        with self._lock:
            pending = {id(t.item.state) for t in self._pending}
            others = [s for key, s in self._streams.items() if key not in pending and not s.cancelled]
            tickets = list(self._pending)
        close = any(self.decoder.schedule.block_size(s.block_index) - len(s.pending) <= policy.join_tokens
                    for s in others)
        if not close:
            self._held_since = None
            return False
        if self._held_since is None:
            self._held_since = now
        if now - self._held_since >= policy.max_hold_s:
            return False
        need = (now - self._held_since) + self._batch_s + policy.margin_s
        for ticket in tickets:
            key = ticket.priority()
            if key[:1] == (ANSWER_KIND,) and (len(key) < 2 or key[1] <= need):
                return False  # this row's speaker would run dry: run now
        self.stats.holds += 1
        return True


class TokenizerBatcher(Batcher["Span"]):
    """Completed 4 s tokenizer blocks of several users' turns, encoded together."""

    def __init__(self, model: WhisperVQEncoder, wake: Callable[[], None] = lambda: None) -> None:
        super().__init__(wake)
        self.model = model

    def priority(self) -> tuple[float, ...]:
        """Its rows' priority, after any conversation of the same: another user's audio that completes a block
        at the same moment is handed in first (the speaker waits on none of this: the user is still talking)."""
        return (*super().priority(), 1)

    def _compute(self, items: list[Span]) -> list[object]:
        from glmvoice_cli.tokenizer.block_encoder import encode_spans

        return list(encode_spans(self.model, items))


@dataclass
class StreamBlocks:
    """One conversation's door to the decoder batcher (a `pipeline.assistant.BlockQueue`): its rows carry its
    priority."""

    batcher: DecoderBatcher
    priority: Priority

    def decode(self, request: BlockRequest) -> Iterator[None]:
        """Hand `request` in and wait (yielding) until it is decoded or cut; a decoding failure is raised."""
        yield from self.batcher.wait(request, self.priority)

    def track(self, state: DecoderState) -> None:
        self.batcher.track(state)

    def untrack(self, state: DecoderState) -> None:
        self.batcher.untrack(state)


@dataclass
class StreamSpans:
    """One conversation's door to the tokenizer batcher (`TurnListener.hear_steps`)."""

    batcher: TokenizerBatcher
    priority: Priority

    def encode(self, span: Span) -> Generator[None, None, SpanResult]:
        result = yield from self.batcher.wait(span, self.priority)
        return result  # type: ignore[return-value]
