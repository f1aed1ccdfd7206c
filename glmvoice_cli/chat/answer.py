"""A conversation's model work, as units for the worker: listening, answering, trimming to what was heard.

`TurnRunner.run(job)` is a generator: between two units (one LM token, one decoder block) it yields to
the worker, and where it waits on the world (a speculative answer waiting for the end of the turn, the
output playing out) it yields `WAIT`, so other conversations run meanwhile. All torch work of a
conversation happens inside these units, on the worker's thread.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from glmvoice_cli.chat.speech_batch import batcher_for, tokenizer_batcher_for
from glmvoice_cli.chat.turn_timing import breakdown, on_input_clock
from glmvoice_cli.chat.worker import READY, WAIT
from glmvoice_cli.errors import AudioDeviceError, ContextLengthError, GlmVoiceError, LMServerError
from glmvoice_cli.events import (
    AnswerAhead,
    AnswerTruncated,
    AssistantTurn,
    AudioChunk,
    ChatState,
    ContextTrimmed,
    Failed,
    TextDelta,
    TurnEnded,
    TurnTimings,
    UserUtterance,
)
from glmvoice_cli.pipeline.history import answer_text, last_turn, trim_finished_answer, trim_to_heard
from glmvoice_cli.pipeline.listening import Speculation
from glmvoice_cli.pipeline.speech_batch import StreamBlocks, StreamSpans

if TYPE_CHECKING:
    import threading

    from glmvoice_cli.audio.devices import AudioSink
    from glmvoice_cli.chat.jobs import Heard, Job, Truncation
    from glmvoice_cli.chat.worker import ModelWorker
    from glmvoice_cli.pipeline import Conversation, NoiseSource, UserInput
    from glmvoice_cli.pipeline.assistant import Assistant
    from glmvoice_cli.pipeline.listening import SpeculationStats, TurnListener

# The worker's order (smallest first): a confirmed answer, then listening work, then speculation, then idle.
KIND_ANSWER, KIND_LISTEN, KIND_SPECULATIVE, KIND_IDLE = 0, 1, 2, 3
PLAYBACK_STALL_S = 5.0
_BUSY = object()  # nothing to compute yet: no free LM cache slot, or a remote LM's token on its way  # queued audio that does not move for this long: the output device is gone


class ConversationCore(Protocol):
    """What the runner uses of its `chat.core.ConversationCore` (which imports this module)."""

    assistant: Assistant
    conversation: Conversation
    listener: TurnListener | None
    output: AudioSink
    speculation: SpeculationStats
    last_turn_error: LMServerError | None
    _play_lock: threading.Lock
    _open: list[Job]
    _kind: int
    worker: ModelWorker

    @property
    def config(self) -> Any: ...  # chat.core.EngineConfig

    @property
    def stopped(self) -> bool: ...

    def set_kind(self, kind: int) -> None: ...

    def priority(self) -> tuple[float, ...]: ...

    def loaded(self) -> bool: ...

    def wake(self) -> None: ...

    def answer_queued(self, turn_start: int) -> bool: ...

    def _set_state(self, state: ChatState) -> None: ...

    def _emit(self, event: object) -> None: ...

    def _fail(self, error: GlmVoiceError) -> None: ...


@dataclass(frozen=True)
class TurnReport:
    """What happened in one exchange, for tests and benchmarks (the store holds the rest)."""

    utterance_end: int  # input sample where the user's turn ended (0 for typed turns)
    first_audio_wall_s: float | None  # end of speech -> first audio block written, wall seconds
    played_samples: int  # answer samples heard (played, or as the transport said)
    interrupted: bool
    barge_in_at: int | None  # input sample of the onset that cut the answer
    kept_ids: tuple[int, ...]  # the answer ids the history keeps
    generated_tokens: int
    timings: TurnTimings | None = None  # the turn's breakdown, from the end of voice
    prefill_tokens: int | None = None  # ids the LM prefilled after the end of the turn (None: no answer)
    tail_frames: int | None = None  # mel frames tokenized after the end of the turn (None: not streamed)
    turn: int = 0  # the turn's number
    underruns: int = 0  # times the output ran dry mid-answer (a block came after the last one had played out)


@dataclass
class _Answer:
    """What one answer collects while it streams."""

    text: list[str] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)  # every block written to the output
    samples: int = 0  # samples written so far (the next chunk's position)
    first_audio: float | None = None  # end of speech -> first block written, wall seconds
    ended: TurnEnded | None = None
    started: bool = False  # the LM has taken the turn (its user ids are in the history)
    user_saved: bool = False  # the user turn was saved and shown (a speculative one only once confirmed)
    user_ids: list[int] = field(default_factory=list)
    held: list[object] = field(default_factory=list)  # a speculative answer's events, not yet confirmed
    tokenized_at: float | None = None  # perf_counter marks for the turn's breakdown
    prefilled_at: float | None = None
    written_at: float | None = None
    prefill_tokens: int | None = None
    underruns: int = 0


class TurnRunner:
    """The model side of one `ConversationCore` (its input side and events live there)."""

    def __init__(self, core: ConversationCore, noise: NoiseSource | None = None) -> None:
        self.core = core
        decoder = core.assistant.decoder
        seed = core.config.generation.seed if core.config.generation is not None else None
        # the stream's own noise: a decoder shared by many conversations never mixes their draws
        self.noise = noise if noise is not None else (decoder.new_noise(seed) if decoder is not None else None)
        # decoder blocks go to the worker's batcher, decoded with other conversations' blocks that are ready
        batcher = batcher_for(core.worker, core.assistant) if core.config.batch_speech else None
        self.blocks = StreamBlocks(batcher, core.priority) if batcher is not None else None
        # and the user's completed tokenizer blocks to its tokenizer batcher
        spans = tokenizer_batcher_for(core.worker, core.assistant) if core.config.batch_speech else None
        self.spans = StreamSpans(spans, core.priority) if spans is not None else None
        self.reports: list[TurnReport] = []
        self._answers: dict[int, int] = {}  # turn -> where its answer starts in the history (the last one)
        self._told_trimmed = False  # ContextTrimmed was emitted

    # ------------------------------------------------------------------ listening

    def hear(self, item: Heard) -> Iterator[str]:
        """Tokenize (and prefill) what the user said; WAIT while a block waits for its batch."""
        core = self.core
        if core.listener is not None:
            waiting = functools.partial(core.answer_queued, item.turn_start)
            for _ in core.listener.hear_steps(item.turn_start, item.samples, core.conversation, waiting,
                                              self.spans):
                yield WAIT

    def truncate_finished(self, item: Truncation) -> None:
        """Trim an answer that has already ended, if it is still the last one (later turns build on it)."""
        start = self._answers.get(item.turn)
        if start is None:
            return
        conv, tok = self.core.conversation, self.core.assistant.lm.text_tokenizer
        if trim_finished_answer(conv, tok, start, item.heard, self.core.output.sample_rate):
            kept = tuple(conv.last_output)
            self.core._emit(AnswerTruncated(item.turn, kept, answer_text(tok, kept), item.heard))

    # ------------------------------------------------------------------ one turn

    def run(self, job: Job) -> Iterator[str]:
        core = self.core
        conv = core.conversation
        core.set_kind(KIND_SPECULATIVE if job.speculative else KIND_ANSWER)
        if not job.speculative:
            core._set_state(ChatState.THINKING)
        answer, start = _Answer(), time.perf_counter()
        error: GlmVoiceError | None = None
        snapshot = Speculation.snapshot(conv) if job.speculative else None
        try:
            if job.samples is not None and core.config.transcribe_user:
                job.text = self._transcribe(job.samples)
                yield READY
            user = self._user_input(job)
            start = answer.tokenized_at = time.perf_counter()
            if not job.speculative:
                with core._play_lock:
                    job.base_played = core.output.played
            for event in self._respond(user, job, answer):
                if not answer.started and event is not _BUSY:
                    taken = last_turn(conv)
                    answer.user_ids, answer.started = taken.user_ids, True
                    answer.prefilled_at, answer.prefill_tokens = taken.prefilled_at, taken.prefill_tokens
                    self._tell_trimmed(job)
                if event is None or event is _BUSY:
                    if job.speculative:
                        self._shed_under_load(job)
                    yield READY if event is None else WAIT
                    continue
                if job.speculative and not self._release(job, answer):
                    answer.held.append(event)
                    self._show_ahead(answer, event)
                    continue
                self._deliver(job, event, answer)
            if job.speculative:
                job.idle.set()
                while not self._release(job, answer):
                    if job.cancel.is_set() or core.stopped:
                        break
                    yield WAIT
        except ContextLengthError as e:  # this turn alone is too long: say so, keep the session going
            if not answer.started:
                self._refuse(job, e)
                return
            error = e
        except LMServerError as e:  # the LM server failed: cut this turn, keep the session, take the next
            job.error = e
        except GlmVoiceError as e:  # a lost speaker, a failing stage: save what was said, then end
            error = e
        except Exception as e:  # noqa: BLE001 - a bug or a torch error: the same, with its cause
            error = engine_error(e)
        finally:
            job.failed = error is not None
            job.idle.set()
            job.generated.set()
        if job.speculative and snapshot is not None and not job.confirmed.is_set():
            # never confirmed: the user went on, or it failed (then the turn runs again, unspeculated,
            # at its end, and fails or not there, with what the user said saved)
            self._drop(snapshot, counted=not job.shed)  # a shed answer is counted as shed, not dropped
            return
        if error is not None:
            core._fail(error)
        yield from self._wait_played(job)
        self._finish_turn(job, answer, start)
        core.last_turn_error = job.error
        if job.error is not None:
            core._emit(Failed(one_line(job.error), recoverable=True))

    def _tell_trimmed(self, job: Job) -> None:
        """The first time the oldest turns are left out to fit the context, say so (once per conversation)."""
        dropped = self.core.conversation.dropped_turns
        if dropped and not self._told_trimmed and not job.speculative:
            self._told_trimmed = True
            self.core._emit(ContextTrimmed(dropped))

    def _shed_under_load(self, job: Job) -> None:
        """A speculative answer gives way to other conversations' confirmed ones: it is dropped (the turn runs
        afresh at its end, as without speculation); the only cost is the head start."""
        core = self.core
        if job.cancel.is_set() or not core.loaded():
            return
        with core._play_lock:
            if not job.claimed:
                job.shed = True
                job.cancel.set()
        if job.shed:
            core.speculation.shed += 1

    def _respond(self, user: UserInput, job: Job, answer: _Answer) -> Iterator[object | None]:
        """The answer's events, with a tick (None) per token; while every LM cache slot is answering other
        conversations, it waits its turn (ticks only) instead of failing."""
        from glmvoice_cli.pipeline import LMSlotsBusy, Pending

        core = self.core
        while True:
            try:
                for event in core.assistant.respond_in_steps(core.conversation, user, core.config.generation,
                                                             job.cancel, noise=self.noise, on_ready=core.wake,
                                                             blocks=self.blocks):
                    yield _BUSY if isinstance(event, Pending) else event
                return
            except LMSlotsBusy:
                if answer.started or job.cancel.is_set() or core.stopped:
                    raise
                kind = core._kind
                core.set_kind(KIND_IDLE)
                yield _BUSY
                core.set_kind(kind)

    def _user_input(self, job: Job) -> UserInput:
        """The turn as LM input: typed text, or speech ids (from the listener when it heard this turn)."""
        from glmvoice_cli.pipeline import TextInput

        if job.samples is None:
            return TextInput(job.text or "")
        listener, n = self.core.listener, len(job.samples)
        if (listener is not None and job.turn_start is not None and listener.covers(job.turn_start, n)
                and np.array_equal(listener.stream.audio[:n], job.samples)):
            user = listener.final_input(n)
            job.tail_frames = listener.stream.stats.last_span_frames
            return user
        return self.core.assistant.hear(job.samples)

    def _release(self, job: Job, answer: _Answer) -> bool:
        """If a speculative answer was confirmed, deliver what it held back and play from now on."""
        if not job.confirmed.is_set():
            return False
        core = self.core
        core.set_kind(KIND_ANSWER)
        core._set_state(ChatState.THINKING)
        with core._play_lock:
            job.base_played = core.output.played
        job.speculative = False
        self._tell_trimmed(job)  # a drop the speculative answer made is the turn's now
        held, answer.held = answer.held, []
        if held and core.config.lockstep:
            core._emit(AnswerAhead())  # what was prepared ahead is the answer now
        for event in held:
            self._deliver(job, event, answer)
        return True

    def _drop(self, snapshot: Speculation, counted: bool = True) -> None:
        """The user went on (or the answer was shed): forget the speculative answer; the cache keeps the
        user's blocks."""
        core = self.core
        snapshot.restore(core.conversation)
        if core.config.lockstep:
            core._emit(AnswerAhead())
        if counted:
            core.speculation.dropped += 1
        if core.listener is not None:
            core.listener.rewarm(core.conversation)

    def _show_ahead(self, answer: _Answer, event: object) -> None:
        """On a virtual clock the input waits for a held answer: say how far it has got (the first event,
        then each audio block: often enough to see it move, few enough for a long answer)."""
        if not self.core.config.lockstep or not (len(answer.held) == 1 or isinstance(event, AudioChunk)):
            return
        text = sum(len(e.text) for e in answer.held if isinstance(e, TextDelta))
        audio = sum(e.seconds for e in answer.held if isinstance(e, AudioChunk))
        self.core._emit(AnswerAhead(text_chars=text, audio_s=round(audio, 3)))

    def _deliver(self, job: Job, event: object, answer: _Answer) -> None:
        if not answer.user_saved:
            self._user_taken(job, answer.user_ids)
            answer.user_saved = True
        self._on_answer_event(job, event, answer)

    def _refuse(self, job: Job, error: GlmVoiceError) -> None:
        """A turn refused before it started: nothing is saved or added to the history."""
        core = self.core
        job.generated.set()
        with core._play_lock:
            if job in core._open:
                core._open.remove(job)
        core._emit(Failed(str(error).splitlines()[0], recoverable=True))
        core._set_state(ChatState.LISTENING)

    def _transcribe(self, samples: np.ndarray) -> str | None:
        from glmvoice_cli.pipeline.transcribe import transcribe

        text = transcribe(self.core.assistant, samples,
                          max_new_tokens=self.core.config.transcribe_max_new_tokens).text
        return text or None

    def _on_answer_event(self, job: Job, event: object, answer: _Answer) -> None:
        core = self.core
        if isinstance(event, TextDelta):
            answer.text.append(event.text)
            core._emit(TextDelta(event.text, turn=job.turn))
        elif isinstance(event, AudioChunk):
            with core._play_lock:
                if job.cancel.is_set():
                    return
                if answer.samples and core.output.pending == 0:
                    answer.underruns += 1  # the user heard a gap inside the answer
                core.output.write(event.samples)
            at, answer.samples = answer.samples, answer.samples + len(event.samples)
            answer.chunks.append(event.samples)
            if answer.first_audio is None:
                answer.written_at = time.perf_counter()
                answer.first_audio = answer.written_at - job.heard_at
                core._set_state(ChatState.SPEAKING)
            core._emit(AudioChunk(event.samples, event.sample_rate, turn=job.turn, at_sample=at))
        elif isinstance(event, TurnEnded):
            answer.ended = event

    def _wait_played(self, job: Job) -> Iterator[str]:
        """Until the answer has played out, or was cut; an output that stops playing is a lost device."""
        output = self.core.output
        last, since = output.pending, time.monotonic()
        while (pending := output.pending) > 0 and not job.cancel.is_set():
            if pending != last:
                last, since = pending, time.monotonic()
            elif time.monotonic() - since > PLAYBACK_STALL_S:
                self.core._fail(AudioDeviceError("the speaker stopped playing (unplugged?); see `glmvoice devices`"))
                return
            yield WAIT

    def _user_taken(self, job: Job, ids: list[int]) -> None:
        """The user's turn is in the history: tell the view, and the writer (which saves it)."""
        core = self.core
        seconds = 0.0 if job.samples is None else len(job.samples) / core.config.vad.sample_rate
        core._emit(UserUtterance(duration_s=seconds, text=job.text, audio_path=job.audio_path,
                                 typed=job.samples is None, turn=job.turn, token_ids=tuple(ids)))

    def _heard(self, job: Job, written: int) -> int:
        """Answer samples the user heard: as the transport said (`truncate`), else the output's count."""
        core = self.core
        with core._play_lock:
            played = 0 if job.base_played is None else max(core.output.played - job.base_played, 0)
            if job in core._open:
                core._open.remove(job)
        return played if job.heard is None else min(job.heard, written)

    def _finish_turn(self, job: Job, answer: _Answer, start: float) -> None:
        """Trim the history to what was heard, save the turn, tell the view."""
        core = self.core
        conv, tok, rate = core.conversation, core.assistant.lm.text_tokenizer, core.output.sample_rate
        played = self._heard(job, answer.samples)
        if not answer.user_saved:  # the model never took the turn (a failure, a stop): still save what was said
            self._user_taken(job, answer.user_ids)
        ended = answer.ended or TurnEnded(interrupted=True, reason="cancelled")
        interrupted = job.cancel.is_set() or ended.interrupted
        generated = len(last_turn(conv).answer_ids) if answer.started else 0
        if interrupted and answer.started:
            trim_to_heard(conv, tok, played, rate)
        after = last_turn(conv)
        kept = tuple(after.answer_ids) if answer.started else ()
        if answer.started and after.answer_start is not None:
            self._answers = {job.turn: after.answer_start}
        reason = ("error" if job.error else "cancelled" if job.stopped else "barge_in" if job.cancel.is_set()
                  else ended.reason)
        listener = core.listener
        marks = listener.marks if listener is not None and job.turn_start == listener.turn_start else None
        if core.config.lockstep:  # a virtual clock: wall-clock marks would mix two clocks
            timings = on_input_clock(ended.timings, job, core.config.vad.sample_rate,
                                     written=answer.written_at is not None)
        else:
            timings = breakdown(ended.timings, origin=job.voice_end_at or job.heard_at, confirmed=job.heard_at,
                                respond_start=start, last_block=marks.last_block_s if marks else None,
                                tokenized=answer.tokenized_at if job.samples is not None else None,
                                prefilled=answer.prefilled_at, written=answer.written_at)
        audio = np.concatenate(answer.chunks)[:played] if answer.chunks else None
        text = answer_text(tok, kept) if interrupted else "".join(answer.text).strip()
        core._emit(AssistantTurn(job.turn, audio, rate, text=text, token_ids=kept, interrupted=interrupted,
                                 timings=timings, reason=reason, audio_path=job.answer_audio_path))
        self.reports.append(TurnReport(
            utterance_end=job.end_sample, first_audio_wall_s=answer.first_audio, played_samples=played,
            interrupted=interrupted, barge_in_at=job.barge_in.at_sample if job.barge_in else None,
            kept_ids=kept, generated_tokens=generated, timings=timings, prefill_tokens=answer.prefill_tokens,
            tail_frames=job.tail_frames, turn=job.turn, underruns=answer.underruns))
        core._emit(TurnEnded(interrupted=interrupted, reason=reason, timings=timings, turn=job.turn))
        core._set_state(ChatState.LISTENING)


def one_line(error: GlmVoiceError) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def engine_error(e: Exception) -> GlmVoiceError:
    """An unexpected failure as one line for the user, chained as by `raise ... from e` (--debug shows it)."""
    error = GlmVoiceError(f"chat engine failed: {type(e).__name__}: {e}")
    error.__cause__ = e
    return error
