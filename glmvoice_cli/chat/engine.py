"""The chat engine: hands-free turns with barge-in, over any audio source and sink.

Two threads, talking only through queues with timeouts and per-turn cancel Events:

    capture thread:  source.read -> echo canceller -> Segmenter -> SpeechStarted / Utterance
                     (an Utterance becomes a job on the model queue; a SpeechStarted while a turn
                     is thinking or speaking is a barge-in)
    model thread:    job -> assistant.hear -> assistant.respond -> AudioChunks into the sink
                     (ALL torch work happens here: on CPU, torch ops from two threads at once
                     oversubscribe the OpenMP pool and run many times slower)

Barge-in: the capture thread sets the turn's cancel Event and flushes the sink under the play lock
(so no block can slip in after the flush); the model thread sees the cancel within one token,
trims the history to what was played (`chat.history.trim_to_heard`), saves the turn as
interrupted, and takes the next job: the utterance that interrupted. States go
IDLE -> LISTENING -> THINKING -> SPEAKING -> (INTERRUPTED) -> LISTENING. Events for the view go to
`engine.events` (a None sentinel ends them); `subscribe()` gives another consumer its own queue of the
same events. With a SessionStore, a third thread (`chat.writer.SessionWriter`) saves the turns from
those events, so neither the model thread nor the capture thread ever waits on the disk.

While the user speaks (`streaming`), the capture thread also forwards the turn's audio (TurnAudio) to
the model thread, whose `chat.listening.TurnListener` tokenizes each completed block and prefills it
into the LM cache. At a short pause (`speculative_pause_ms`) a speculative job starts the answer: its
events are held back, not played, shown or saved, and the turn is not numbered. If the user goes on
(SpeechResumed) it is cancelled and the conversation put back exactly as it was; if the pause becomes
the end of the turn (an Utterance with the same end), the capture thread confirms it and the held
events are delivered at once. Every turn's breakdown (`chat.turn_timing`) counts from the end of voice.

`lockstep=True` is for a source on a VirtualClock (tests, `--input-file` without `--realtime`):
the capture thread waits until each answer (and each speculative one) is fully generated before it
reads on, so model time
counts as zero and a whole conversation is reproducible and runs as fast as the CPU allows.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from glmvoice_cli.audio.echo import NullEchoCanceller
from glmvoice_cli.audio.playback import VirtualClock
from glmvoice_cli.audio.vad import (
    Segmenter,
    SpeechDiscarded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    TurnAudio,
    Utterance,
    VadConfig,
)
from glmvoice_cli.chat.history import answer_text, trim_to_heard
from glmvoice_cli.chat.listening import Speculation, SpeculationStats, TurnListener
from glmvoice_cli.chat.turn_timing import breakdown
from glmvoice_cli.chat.writer import SessionWriter
from glmvoice_cli.config import SPECULATIVE_PAUSE_MS
from glmvoice_cli.errors import AudioDeviceError, ContextLengthError, GlmVoiceError, LMServerError
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

if TYPE_CHECKING:
    from glmvoice_cli.audio.devices import AudioSink, AudioSource
    from glmvoice_cli.audio.echo import EchoCanceller
    from glmvoice_cli.audio.playback import Clock
    from glmvoice_cli.audio.vad import FrameClassifier
    from glmvoice_cli.chat.store import SessionStore
    from glmvoice_cli.lm.prompts import UserInput
    from glmvoice_cli.lm.voice_lm import Conversation, GenerationOptions
    from glmvoice_cli.pipeline import Assistant

TURN_TRANSCRIPT_MAX_TOKENS = 100  # --transcribe-user: text tokens for one spoken turn, which is short
READ_TIMEOUT_S = 0.1  # longest wait on the source, so stop() is noticed quickly
POLL_S = 0.01  # queue waits and playback-drain polls
LEVEL_EVERY_BLOCKS = 5  # capture blocks between input-level updates (150 ms at 30 ms blocks)
IDLE_TICK_S = 0.03  # virtual time advanced per wait once the source has ended
JOIN_TIMEOUT_S = 10.0  # how long join() waits for a thread that is inside a model call
PLAYBACK_STALL_S = 5.0  # queued audio that does not move for this long: the output device is gone


@dataclass(frozen=True)
class EngineConfig:
    vad: VadConfig = field(default_factory=VadConfig)
    generation: GenerationOptions | None = None  # None: the LM's defaults
    lockstep: bool = False  # see the module docstring (needs `clock`)
    barge_in: bool = True  # False: the user's speech while the assistant answers waits its turn
    transcribe_user: bool = False  # a text-only LM pass before each answer (costs latency) fills the user's text
    transcribe_max_new_tokens: int = TURN_TRANSCRIPT_MAX_TOKENS
    streaming: bool = True  # tokenize each completed block and prefill it while the user speaks
    speculative_pause_ms: int | None = SPECULATIVE_PAUSE_MS  # start answering (unheard) at this pause


@dataclass
class _Job:
    """One user turn on its way through the model thread."""

    samples: np.ndarray | None = None  # (n,) float32 16 kHz speech; None for a typed turn
    turn: int = 0  # numbered by _submit, from 1
    audio_path: str | None = None  # the name the store reserved for the speech
    text: str | None = None  # the typed text
    end_sample: int = 0  # end of the utterance on the input timeline (16 kHz samples)
    heard_at: float = 0.0  # perf_counter when the turn was complete (end of speech)
    cancel: threading.Event = field(default_factory=threading.Event)
    generated: threading.Event = field(default_factory=threading.Event)  # the answer is fully generated
    barge_in: SpeechStarted | None = None  # the onset that cut this turn
    stopped: bool = False  # cut by stop() (Ctrl-C, a failure)
    error: LMServerError | None = None  # the LM server failed this turn (the chat goes on)
    base_played: int | None = None  # sink.played when the answer started (None: not started yet)
    turn_start: int | None = None  # input sample where the spoken turn began (the listener's turn id)
    voice_end_at: float | None = None  # perf_counter when the last voiced frame was read (end of voice)
    speculative: bool = False  # started at a pause: held back (never played, saved or shown) until confirmed
    confirmed: threading.Event = field(default_factory=threading.Event)  # the pause was the end of the turn
    idle: threading.Event = field(default_factory=threading.Event)  # generated, waiting for the verdict
    tail_frames: int | None = None  # mel frames the listener still had to tokenize at the end of the turn
    failed: bool = False  # a speculative answer that failed: the end of turn runs the turn afresh


@dataclass(frozen=True)
class _Heard:
    """Audio of the turn in progress, for the listener on the model thread."""

    turn_start: int
    samples: np.ndarray


@dataclass(frozen=True)
class TurnReport:
    """What happened in one exchange, for tests and benchmarks (the store holds the rest)."""

    utterance_end: int  # input sample where the user's turn ended (0 for typed turns)
    first_audio_wall_s: float | None  # end of speech -> first audio block written, wall seconds
    played_samples: int  # answer samples the sink played (what was heard)
    interrupted: bool
    barge_in_at: int | None  # input sample of the onset that cut the answer
    kept_ids: tuple[int, ...]  # the answer ids the history keeps
    generated_tokens: int
    timings: TurnTimings | None = None  # the turn's breakdown, from the end of voice
    prefill_tokens: int | None = None  # ids the LM prefilled after the end of the turn (None: no answer)
    tail_frames: int | None = None  # mel frames tokenized after the end of the turn (None: not streamed)


_END = object()  # no more input: finish the queued turns and stop


class ChatEngine:
    """Runs a conversation between `source` (None: typed turns only) and `sink`; see the module docstring."""

    def __init__(self, assistant: Assistant, source: AudioSource | None, sink: AudioSink, *,
                 store: SessionStore | None = None, conversation: Conversation | None = None,
                 echo: EchoCanceller | None = None, config: EngineConfig | None = None,
                 classifier: FrameClassifier | None = None, clock: Clock | None = None) -> None:
        self.assistant, self.source, self.sink, self.store = assistant, source, sink, store
        self.config = config or EngineConfig()
        self.conversation = conversation if conversation is not None else assistant.lm.new_conversation()
        self.echo = echo or NullEchoCanceller()
        tokenizer = assistant.speech_tokenizer
        self.listener = (TurnListener(tokenizer, assistant.lm,  # type: ignore[arg-type]
                                      prefill=hasattr(assistant.lm, "warm"))
                         if self.config.streaming and source is not None and tokenizer is not None else None)
        pause = self.config.speculative_pause_ms if not self.config.transcribe_user else None
        self.segmenter = (Segmenter(self.config.vad, classifier, stream_turns=self.listener is not None,
                                    pause_ms=pause or None) if source is not None else None)
        self._spec: _Job | None = None  # the speculative answer under way (capture thread's view)
        self.speculation = SpeculationStats()
        self._voice_end_at: float | None = None  # perf_counter of the last voiced frame read
        self.clock = clock
        self.events: queue.Queue[object | None] = queue.Queue()  # the view's; a None sentinel ends them
        self._consumers = [self.events]
        self.reports: list[TurnReport] = []
        self._error: GlmVoiceError | None = None  # the first failure (any thread), under _state_lock
        self._state = ChatState.IDLE  # under _state_lock: the capture and model threads both change it
        self._state_lock = threading.Lock()
        self._jobs: queue.Queue[_Job | object] = queue.Queue()
        self._open: list[_Job] = []  # turns queued or running, not yet finished (under _play_lock)
        self._turns = 0  # turns submitted so far (under _play_lock)
        self.last_turn_error: LMServerError | None = None  # the last turn failed on the LM server
        self._play_lock = threading.Lock()  # sink writes vs. barge-in flushes
        self._stop = threading.Event()
        self._done = threading.Event()
        self._level = 0.0
        self._threads: list[threading.Thread] = []
        self._writer = SessionWriter(store, self.subscribe(), self._fail) if store is not None else None

    # ------------------------------------------------------------------ control

    @property
    def state(self) -> ChatState:
        with self._state_lock:
            return self._state

    @property
    def error(self) -> GlmVoiceError | None:
        """The first failure of any thread (its cause chained), or None."""
        with self._state_lock:
            return self._error

    def subscribe(self) -> queue.Queue[object | None]:
        """A queue of every event from now on, ended by None; call it before start()."""
        consumer: queue.Queue[object | None] = queue.Queue()
        self._consumers.append(consumer)
        return consumer

    def start(self) -> None:
        if self._writer is not None:
            self._writer.start()
        self._set_state(ChatState.LISTENING)
        self._threads = [threading.Thread(target=self._model_loop, name="glmvoice-model", daemon=True)]
        if self.source is not None:
            self._threads.append(threading.Thread(target=self._capture_loop, name="glmvoice-capture", daemon=True))
        for thread in self._threads:
            thread.start()

    def type_text(self, text: str) -> None:
        """Queue a typed turn (answered in speech, like a spoken one)."""
        if text.strip():
            self._submit(_Job(text=text.strip(), heard_at=time.perf_counter()))

    def end_input(self) -> None:
        """No more typed turns: the engine ends once the queued ones are answered (text mode)."""
        self._jobs.put(_END)

    def stop(self) -> None:
        """Cut the running answer (it is saved as interrupted) and end both threads."""
        self._stop.set()
        spec = self._spec
        if spec is not None:
            spec.cancel.set()
        with self._play_lock:
            for job in list(self._open):
                job.stopped = True
                job.cancel.set()
            self.sink.flush()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the engine has ended (input done and answered, stopped, or failed)."""
        return self._done.wait(timeout)

    def join(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Wait for the threads, the session writer last (it saves what the model thread finished)."""
        for thread in self._threads:
            thread.join(timeout)
        if self._writer is not None:
            self._writer.join(timeout)

    def run(self) -> None:
        """start(), then wait until the end; Ctrl-C stops cleanly and is re-raised."""
        self.start()
        try:
            while not self.wait(READ_TIMEOUT_S):
                pass
        except KeyboardInterrupt:
            self.stop()
            self.join()
            raise
        self.join()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ capture thread

    def _capture_loop(self) -> None:
        assert self.source is not None and self.segmenter is not None
        blocks = 0
        try:
            while not self._stop.is_set():
                block = self.source.read(READ_TIMEOUT_S)
                if block is None:
                    break
                if len(block) == 0:
                    continue
                blocks += 1
                self._level = float(np.sqrt(np.mean(np.square(block, dtype=np.float64))))
                if blocks % LEVEL_EVERY_BLOCKS == 0:
                    self._emit(StatusChanged(self.state, self._level))
                voiced = self.segmenter.state.last_voiced_end
                events = self.segmenter.push(self.echo.process(block))
                if self.segmenter.state.last_voiced_end != voiced:
                    self._voice_end_at = time.perf_counter()
                for event in events:
                    self._on_segment(event)
            if not self._stop.is_set():
                for event in self.segmenter.finish():
                    self._on_segment(event)
        except GlmVoiceError as e:
            self._fail(e)
            return
        self._jobs.put(_END)
        self._idle_until_done()

    def _idle_until_done(self) -> None:
        """Input ended: let the queued answers play out (advancing a virtual clock ourselves)."""
        clock = self.clock if isinstance(self.clock, VirtualClock) else None  # nobody else moves it
        while not self._done.is_set():
            if clock is not None:
                clock.advance(IDLE_TICK_S)
                if self.sink.pending == 0:
                    self._done.wait(POLL_S)
            else:
                self._done.wait(POLL_S)

    def _on_segment(self, event: object) -> None:
        if isinstance(event, TurnAudio):
            self._jobs.put(_Heard(event.turn_start, event.samples))
        elif isinstance(event, SpeechPaused):
            self._speculate(event.utterance)
        elif isinstance(event, SpeechResumed):
            self._drop_speculation()
        elif isinstance(event, SpeechStarted):
            self._emit(UserTurnStarted())
            if self.config.barge_in:
                self._barge_in(event)
        elif isinstance(event, Utterance):
            if self.config.barge_in:
                self._barge_in(None)  # a turn that goes on after a max-length cut
            job = self._confirm(event)
            if job is None:
                job = _Job(samples=event.samples, end_sample=event.end_sample, heard_at=time.perf_counter(),
                           turn_start=event.start_sample, voice_end_at=self._voice_end_at)
                self._submit(job)
            if self.config.lockstep:
                self._wait_lockstep(job.generated)
        elif isinstance(event, SpeechDiscarded):
            self._drop_speculation()
            self._emit(UserUtterance(duration_s=0.0))  # closes the view's open user turn

    def _wait_lockstep(self, done: threading.Event) -> None:
        while not done.wait(POLL_S) and not self._stop.is_set():
            pass

    def _speculate(self, utterance: Utterance) -> None:
        """A short pause: start answering what was said so far, without playing it."""
        self._drop_speculation()
        job = _Job(samples=utterance.samples, end_sample=utterance.end_sample, turn_start=utterance.start_sample,
                   voice_end_at=self._voice_end_at, speculative=True)
        self._spec = job
        self.speculation.started += 1
        self._jobs.put(job)
        if self.config.lockstep:
            self._wait_lockstep(job.idle)

    def _drop_speculation(self) -> None:
        spec, self._spec = self._spec, None
        if spec is not None:
            spec.cancel.set()

    def _confirm(self, utterance: Utterance) -> _Job | None:
        """The end of turn: the speculative answer of this very utterance, if one is under way, plays now."""
        spec, self._spec = self._spec, None
        if spec is None:
            return None
        same = (not utterance.truncated and spec.turn_start == utterance.start_sample
                and spec.end_sample == utterance.end_sample)
        if not same or spec.failed:
            spec.cancel.set()
            return None
        spec.heard_at = time.perf_counter()
        self.speculation.confirmed += 1
        self._register(spec)  # only now is it a turn: numbered, its audio saved, open to barge-in
        spec.confirmed.set()
        return spec

    def _barge_in(self, onset: SpeechStarted | None) -> None:
        """Cut every open turn and silence the speaker at once."""
        with self._play_lock:
            playing = self.sink.pending > 0
            open_jobs = [job for job in self._open
                         if not job.cancel.is_set() and (playing or not job.generated.is_set())]
            if not open_jobs:
                return
            for job in open_jobs:
                job.barge_in = onset
                job.cancel.set()
            self.sink.flush()
            base = open_jobs[0].base_played
            played = 0 if base is None else self.sink.played - base
        self._set_state(ChatState.INTERRUPTED)
        self._emit(Interrupted(played_s=max(played, 0) / self.sink.sample_rate))

    def _submit(self, job: _Job) -> None:
        """Number the turn, hand spoken audio to the store's writer at once, queue it for the model."""
        self._register(job)
        self._jobs.put(job)

    def _register(self, job: _Job) -> None:
        with self._play_lock:
            self._turns += 1
            job.turn = self._turns
            self._open.append(job)
        if job.samples is not None:
            job.audio_path = None if self.store is None else self.store.audio_name("user")
            self._emit(UserAudio(job.turn, job.samples, self.config.vad.sample_rate, job.audio_path))

    # ------------------------------------------------------------------ model thread

    def _model_loop(self) -> None:
        try:
            prepare = getattr(self.assistant.lm, "prepare_thread", None)  # the in-process LM: CUDA graphs
            if prepare is not None:
                prepare()
            while True:
                try:
                    job = self._jobs.get(timeout=POLL_S)
                except queue.Empty:
                    if self._stop.is_set():
                        break
                    continue
                if isinstance(job, _Heard) and not self._stop.is_set():
                    if self.listener is not None:
                        waiting = functools.partial(self._answer_queued, job.turn_start)
                        self.listener.hear(job.turn_start, job.samples, self.conversation, waiting)
                    continue
                if not isinstance(job, _Job) or self._stop.is_set():
                    break
                self._run_turn(job)
        except GlmVoiceError as e:
            self._fail(e)
        except Exception as e:  # noqa: BLE001 - a bug or a torch error: end cleanly and say what it was
            self._fail(_engine_error(e))
        finally:
            with self._play_lock:
                for job in self._open:
                    job.generated.set()  # never leave the capture thread waiting
            self._set_state(ChatState.IDLE)
            self._done.set()
            self._stop.set()
            for consumer in self._consumers:
                consumer.put(None)

    def _answer_queued(self, turn_start: int) -> bool:
        """An answer to the turn that began at `turn_start` waits in the queue (speculative or confirmed)."""
        with self._jobs.mutex:  # the queue's own lock: the capture thread may be putting
            return any(isinstance(job, _Job) and job.turn_start == turn_start for job in self._jobs.queue)

    def _run_turn(self, job: _Job) -> None:
        conv = self.conversation
        if not job.speculative:
            self._set_state(ChatState.THINKING)
        answer, start = _Answer(), time.perf_counter()
        error: GlmVoiceError | None = None
        snapshot = Speculation.snapshot(conv) if job.speculative else None
        try:
            if job.samples is not None and self.config.transcribe_user:
                job.text = self._transcribe(job.samples)
            user = self._user_input(job)
            start = answer.tokenized_at = time.perf_counter()
            if not job.speculative:
                with self._play_lock:
                    job.base_played = self.sink.played
            for event in self.assistant.respond(conv, user, self.config.generation, job.cancel):
                if not answer.started:
                    answer.user_ids, answer.started = conv.ids[conv.last_input_start : conv.last_output_start], True
                    answer.prefilled_at, answer.prefill_tokens = conv.prefilled_at, conv.last_prefill_tokens
                if job.speculative and not self._release(job, answer):
                    answer.held.append(event)
                    continue
                self._deliver(job, event, answer)
            if job.speculative:
                self._await_verdict(job, answer)
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
            error = _engine_error(e)
        finally:
            job.failed = error is not None
            job.idle.set()
            job.generated.set()
        if job.speculative and snapshot is not None and not job.confirmed.is_set():
            # never confirmed: the user went on, or it failed (then the turn runs again, unspeculated,
            # at its end, and fails or not there, with what the user said saved)
            self._drop(snapshot)
            return
        if error is not None:
            self._fail(error)
        self._wait_played(job)
        self._finish_turn(job, answer, start)
        self.last_turn_error = job.error
        if job.error is not None:
            self._emit(Failed(_one_line(job.error), recoverable=True))

    def _user_input(self, job: _Job) -> UserInput:
        """The turn as LM input: typed text, or speech ids (from the listener when it heard this turn)."""
        from glmvoice_cli.lm.prompts import TextInput

        if job.samples is None:
            return TextInput(job.text or "")
        listener, n = self.listener, len(job.samples)
        if (listener is not None and job.turn_start is not None and listener.covers(job.turn_start, n)
                and np.array_equal(listener.stream.audio[:n], job.samples)):
            user = listener.final_input(n)
            job.tail_frames = listener.stream.stats.last_span_frames
            return user
        return self.assistant.hear(job.samples)

    def _release(self, job: _Job, answer: _Answer) -> bool:
        """If a speculative answer was confirmed, deliver what it held back and play from now on."""
        if not job.confirmed.is_set():
            return False
        self._set_state(ChatState.THINKING)
        with self._play_lock:
            job.base_played = self.sink.played
        job.speculative = False
        held, answer.held = answer.held, []
        for event in held:
            self._deliver(job, event, answer)
        return True

    def _await_verdict(self, job: _Job, answer: _Answer) -> bool:
        """A speculative answer is generated: wait for the end of turn (True) or the user going on (False)."""
        job.idle.set()
        while not self._release(job, answer):
            if job.cancel.is_set() or self._stop.is_set():
                return False
            job.confirmed.wait(POLL_S)
        return True

    def _drop(self, snapshot: Speculation) -> None:
        """The user went on: forget the speculative answer; the cache keeps the user's blocks."""
        snapshot.restore(self.conversation)
        self.speculation.dropped += 1
        if self.listener is not None:
            self.listener.rewarm(self.conversation)

    def _deliver(self, job: _Job, event: object, answer: _Answer) -> None:
        if not answer.user_saved:
            self._user_taken(job, answer.user_ids)
            answer.user_saved = True
        self._on_answer_event(job, event, answer)

    def _refuse(self, job: _Job, error: GlmVoiceError) -> None:
        """A turn refused before it started: nothing is saved or added to the history."""
        job.generated.set()
        with self._play_lock:
            self._open.remove(job)
        self._emit(Failed(str(error).splitlines()[0], recoverable=True))
        self._set_state(ChatState.LISTENING)

    def _transcribe(self, samples: np.ndarray) -> str | None:
        from glmvoice_cli.transcribe import transcribe

        text = transcribe(self.assistant, samples, max_new_tokens=self.config.transcribe_max_new_tokens).text
        return text or None

    def _on_answer_event(self, job: _Job, event: object, answer: _Answer) -> None:
        if isinstance(event, TextDelta):
            answer.text.append(event.text)
            self._emit(event)
        elif isinstance(event, AudioChunk):
            with self._play_lock:
                if job.cancel.is_set():
                    return
                self.sink.write(event.samples)
            answer.chunks.append(event.samples)
            if answer.first_audio is None:
                answer.written_at = time.perf_counter()
                answer.first_audio = answer.written_at - job.heard_at
                self._set_state(ChatState.SPEAKING)
            self._emit(event)
        elif isinstance(event, TurnEnded):
            answer.ended = event

    def _wait_played(self, job: _Job) -> None:
        """Return once the answer has played out, or was cut; a sink that stops playing is a lost device."""
        last, since = self.sink.pending, time.monotonic()
        while (pending := self.sink.pending) > 0 and not job.cancel.is_set():
            if pending != last:
                last, since = pending, time.monotonic()
            elif time.monotonic() - since > PLAYBACK_STALL_S:
                self._fail(AudioDeviceError("the speaker stopped playing (unplugged?); see `glmvoice devices`"))
                return
            job.cancel.wait(POLL_S)

    def _user_taken(self, job: _Job, ids: list[int]) -> None:
        """The user's turn is in the history: tell the view, and the writer (which saves it)."""
        seconds = 0.0 if job.samples is None else len(job.samples) / self.config.vad.sample_rate
        self._emit(UserUtterance(duration_s=seconds, text=job.text, audio_path=job.audio_path,
                                 typed=job.samples is None, turn=job.turn, token_ids=tuple(ids)))

    def _finish_turn(self, job: _Job, answer: _Answer, start: float) -> None:
        """Trim the history to what was heard, save the turn, tell the view."""
        conv, tok, rate = self.conversation, self.assistant.lm.text_tokenizer, self.sink.sample_rate
        with self._play_lock:
            played = 0 if job.base_played is None else max(self.sink.played - job.base_played, 0)
            if job in self._open:
                self._open.remove(job)
        if not answer.user_saved:  # the model never took the turn (a failure, a stop): still save what was said
            self._user_taken(job, answer.user_ids)
        ended = answer.ended or TurnEnded(interrupted=True, reason="cancelled")
        interrupted = job.cancel.is_set() or ended.interrupted
        generated = len(conv.last_output) if answer.started else 0
        if interrupted and answer.started:
            trim_to_heard(conv, tok, played, rate)
        kept = tuple(conv.last_output) if answer.started else ()
        reason = ("error" if job.error else "cancelled" if job.stopped else "barge_in" if job.cancel.is_set()
                  else ended.reason)
        listener = self.listener
        marks = listener.marks if listener is not None and job.turn_start == listener.turn_start else None
        timings = breakdown(ended.timings, origin=job.voice_end_at or job.heard_at, confirmed=job.heard_at,
                            respond_start=start, last_block=marks.last_block_s if marks else None,
                            tokenized=answer.tokenized_at if job.samples is not None else None,
                            prefilled=answer.prefilled_at, written=answer.written_at)
        audio = np.concatenate(answer.chunks)[:played] if answer.chunks else None
        text = answer_text(tok, kept) if interrupted else "".join(answer.text).strip()
        self._emit(AssistantTurn(job.turn, audio, rate, text=text, token_ids=kept, interrupted=interrupted,
                                 timings=timings, reason=reason))
        self.reports.append(TurnReport(
            utterance_end=job.end_sample, first_audio_wall_s=answer.first_audio, played_samples=played,
            interrupted=interrupted, barge_in_at=job.barge_in.at_sample if job.barge_in else None,
            kept_ids=kept, generated_tokens=generated, timings=timings, prefill_tokens=answer.prefill_tokens,
            tail_frames=job.tail_frames))
        self._emit(TurnEnded(interrupted=interrupted, reason=reason, timings=timings))
        self._set_state(ChatState.LISTENING)

    # ------------------------------------------------------------------ shared

    def _emit(self, event: object) -> None:
        for consumer in self._consumers:
            consumer.put(event)

    def _set_state(self, state: ChatState) -> None:
        with self._state_lock:  # the emitted order of states is the order they were set in
            self._state = state
            self._emit(StatusChanged(state, self._level))

    def _fail(self, error: GlmVoiceError) -> None:
        """A device, model or disk failure: say it once, cut the running turn (it is still saved), end."""
        with self._state_lock:
            first = self._error is None
            if first:
                self._error = error
        if first:
            self._emit(Failed(_one_line(error)))
        self.stop()


def _one_line(error: GlmVoiceError) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


@dataclass
class _Answer:
    """What the model thread collects while one answer streams."""

    text: list[str] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)  # every block written to the sink
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


def _engine_error(e: Exception) -> GlmVoiceError:
    """An unexpected failure as one line for the user, chained as by `raise ... from e` (--debug shows it)."""
    error = GlmVoiceError(f"chat engine failed: {type(e).__name__}: {e}")
    error.__cause__ = e
    return error
