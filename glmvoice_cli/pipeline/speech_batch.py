"""The speech decoder's blocks of several conversations, decoded together.

Each conversation's answer hands its next decoder block to the `DecoderBatcher` and waits; when the
batcher runs (`chat.speech_batch` makes it a task of the model worker) it decodes every block handed in
so far in one batch (`SpeechDecoder.
decode_blocks`: one flow and one vocoder call per shape), so N people talking at once cost about one
block's time on a GPU instead of N. Rows are independent: each stream keeps its noise and caches, and a
barge-in in one drops its row only.

When to run: the batcher's priority is its most urgent row's (a confirmed answer whose speaker runs dry
first), so it runs when that row would have run alone. It waits for more rows only while another stream is
a few tokens short of its own block and every waiting row's speaker has audio queued for longer than that
wait plus the batch itself (`BatchPolicy`); it never holds a row whose speaker would run dry first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glmvoice_cli.decoder.speech_decoder import BlockRequest, DecoderState, SpeechDecoder

Priority = Callable[[], tuple[float, ...]]
ANSWER_KIND = 0  # a priority's first element for a confirmed answer (chat.answer.KIND_ANSWER)


@dataclass(frozen=True)
class BatchPolicy:
    """How long a batch may wait for another stream's block (see the module docstring)."""

    join_tokens: int = 13  # a stream this many tokens (or fewer) short of its block is worth waiting for
    max_hold_s: float = 0.25  # never wait longer than this for it
    margin_s: float = 0.1  # audio a waiting row's speaker must keep beyond the wait and the batch


@dataclass
class Ticket:
    """A block handed to the batcher; `done` once decoded or cut, `error` if decoding failed."""

    request: BlockRequest
    priority: Priority
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.error is not None or self.request.done


@dataclass
class BatchStats:
    """What the batcher did (benchmarks, tests)."""

    batches: list[int] = field(default_factory=list)  # rows per batch run
    holds: int = 0  # times it waited for another stream's block
    seconds: list[float] = field(default_factory=list)  # wall time per batch


class DecoderBatcher:
    """Decodes the blocks that conversations hand in, together (see the module docstring).

    `wake` is called when a block is handed in and when a batch is done (the worker asks its waiting
    tasks again)."""

    def __init__(self, decoder: SpeechDecoder, wake: Callable[[], None] = lambda: None,
                 policy: BatchPolicy | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.decoder, self.wake = decoder, wake
        self.policy = policy or BatchPolicy()
        self.stats = BatchStats()
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: list[Ticket] = []
        self._streams: dict[int, DecoderState] = {}  # answers decoding now: who might join a batch
        self._held_since: float | None = None
        self._block_s = 0.0  # recent seconds per batch (what a waiting row's speaker must cover)

    # ------------------------------------------------------------------ the conversations' side

    def submit(self, request: BlockRequest, priority: Priority) -> Ticket:
        ticket = Ticket(request, priority)
        with self._lock:
            self._pending.append(ticket)
        self.wake()
        return ticket

    def withdraw(self, ticket: Ticket) -> None:
        """The answer went away (dropped, stopped) before its block was decoded: forget it."""
        with self._lock:
            if ticket in self._pending:
                self._pending.remove(ticket)

    def decode(self, request: BlockRequest, priority: Priority) -> Iterator[None]:
        """Hand `request` in and wait (yielding) until it is decoded or cut; a decoding failure is raised."""
        ticket = self.submit(request, priority)
        try:
            while not ticket.done:
                yield None
        finally:
            self.withdraw(ticket)
        if ticket.error is not None:
            raise ticket.error

    def track(self, state: DecoderState) -> None:
        """An answer started decoding: its next block may be worth waiting for."""
        with self._lock:
            self._streams[id(state)] = state

    def untrack(self, state: DecoderState) -> None:
        with self._lock:
            self._streams.pop(id(state), None)

    # ------------------------------------------------------------------ the runner's side

    @property
    def waiting(self) -> bool:
        """Blocks are handed in and not yet decoded."""
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
        """Every waiting answer fails with `error` (the worker itself failed)."""
        with self._lock:
            tickets, self._pending = self._pending, []
        for ticket in tickets:
            ticket.error = error
        self.wake()

    def run(self) -> None:
        """Decode every block handed in so far, in one batch."""
        with self._lock:
            tickets, self._pending = self._pending, []
        self._held_since = None
        live = [t for t in tickets if not t.request.is_cut()]
        for ticket in tickets:
            if ticket not in live:  # cut before its turn: nothing to compute
                ticket.request.cut = ticket.request.state.cancelled = True
        started = time.perf_counter()
        try:
            if live:
                self.decoder.decode_blocks([t.request for t in live])
        except Exception as e:  # noqa: BLE001 - each waiting answer fails with it; the batcher goes on
            for ticket in live:
                ticket.error = e
        elapsed = time.perf_counter() - started
        if live:
            self.stats.batches.append(len(live))
            self.stats.seconds.append(elapsed)
            self._block_s = elapsed if not self._block_s else 0.5 * (self._block_s + elapsed)
        self.wake()  # the answers waiting on these blocks go on

    def hold(self) -> bool:
        """Wait for another stream's block instead of running now? Only while it is close and no waiting row's
        speaker needs more (see `BatchPolicy`)."""
        policy, now = self.policy, self._clock()
        with self._lock:
            pending = {id(t.request.state) for t in self._pending}
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
        need = (now - self._held_since) + self._block_s + policy.margin_s
        for ticket in tickets:
            key = ticket.priority()
            if key[:1] == (ANSWER_KIND,) and (len(key) < 2 or key[1] <= need):
                return False  # this row's speaker would run dry: run now
        self.stats.holds += 1
        return True


@dataclass
class StreamBlocks:
    """One conversation's door to the batcher (a `pipeline.assistant.BlockQueue`): its rows carry its priority."""

    batcher: DecoderBatcher
    priority: Priority

    def decode(self, request: BlockRequest) -> Iterator[None]:
        return self.batcher.decode(request, self.priority)

    def track(self, state: DecoderState) -> None:
        self.batcher.track(state)

    def untrack(self, state: DecoderState) -> None:
        self.batcher.untrack(state)
