"""The conversation core: one conversation's turn-taking, driven by any transport, run by a model worker.

A transport (the terminal's microphone and speaker in `chat.engine`, a WebSocket in a server) feeds the
core what the user does, and the core says what happens as events; the model work runs as units on a
shared `chat.worker.ModelWorker`, so one worker serves many conversations. Nothing here opens a device,
a socket or a thread of its own (the optional session writer aside).

Driving it (any thread):

    push_audio(frames)        16 kHz float32 microphone frames, in order (the core counts sample positions)
    type_text(text)           a typed turn
    submit_audio(samples)     a whole spoken turn at once (push-to-talk: the transport buffered it)
    commit()                  end the user's turn now (push-to-talk), without waiting for the silence
    interrupt()               cut the answer under way and silence the output
    truncate(turn, heard_ms)  the transport says how much of an answer the user heard: the history keeps that
    update(settings)          new turn-taking settings (applied between turns)
    end_input()               no more input: finish the queued turns, then end

Events (`events`, or a queue from `subscribe()`; a None sentinel ends them) carry the conversation id,
the turn number and, for audio, the sample position (see `events`). The answer's audio goes to
`output`, an `AudioSink`: the local speaker, or a queue that a network transport drains. What was heard
is the output's played count, unless the transport says otherwise with `truncate`.

Turn states go IDLE -> LISTENING -> THINKING -> SPEAKING -> (INTERRUPTED) -> LISTENING. While the user
speaks (`streaming`), completed blocks are tokenized and prefilled (`chat.listening.TurnListener`); at a
short pause a speculative answer starts, held back (not played, shown or saved) until the pause proves to
be the end of the turn, dropped with the conversation put back exactly as it was if the user goes on.
Barge-in: a confirmed onset while an answer is open cuts it; the answer's history is trimmed to what was
heard (`chat.history.trim_to_heard`) and it is saved as interrupted.

`lockstep=True` is for input on a VirtualClock (tests, `--input-file` without `--realtime`): `push_audio`
returns only once each answer (and each speculative one) is fully generated, so model time counts as
zero and a whole conversation is reproducible.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from glmvoice_cli.audio.end_of_turn import JudgeThread, PauseRequest, TurnEndPolicy, turn_vad
from glmvoice_cli.audio.vad import (
    Segmenter,
    SpeechDiscarded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    TurnAudio,
    Utterance,
)
from glmvoice_cli.chat.answer import KIND_IDLE, KIND_LISTEN, TurnRunner, engine_error, one_line
from glmvoice_cli.chat.jobs import END, Heard, Job, Truncation
from glmvoice_cli.chat.settings import EngineConfig, TurnSettings, check_turn_end
from glmvoice_cli.chat.worker import READY, WAIT
from glmvoice_cli.config import SPECULATIVE_PAUSE_MS
from glmvoice_cli.errors import GlmVoiceError, LMServerError, UsageError
from glmvoice_cli.events import (
    ChatState,
    Failed,
    Interrupted,
    StatusChanged,
    Tagged,
    TurnJudged,
    TypedQueued,
    UserAudio,
    UserTurnStarted,
    UserUtterance,
)
from glmvoice_cli.pipeline.listening import SpeculationStats
from glmvoice_cli.sessions.writer import SessionWriter

if TYPE_CHECKING:
    from collections.abc import Generator

    from glmvoice_cli.audio.devices import AudioSink
    from glmvoice_cli.audio.end_of_turn import Judgement, TurnJudge
    from glmvoice_cli.audio.vad import FrameClassifier
    from glmvoice_cli.chat.worker import ModelWorker
    from glmvoice_cli.pipeline import Conversation, NoiseSource
    from glmvoice_cli.pipeline.assistant import Assistant
    from glmvoice_cli.sessions.store import SessionStore

log = logging.getLogger(__name__)
POLL_S = 0.01  # lockstep waits
LEVEL_EVERY_BLOCKS = 5  # pushed blocks between input-level updates (150 ms at 30 ms blocks)
MS_PER_SECOND = 1000
_IDS = itertools.count(1)



class ConversationCore:
    """One conversation (see the module docstring); its model work runs on `worker`."""

    def __init__(self, assistant: Assistant, output: AudioSink, worker: ModelWorker, *,
                 store: SessionStore | None = None, conversation: Conversation | None = None,
                 config: EngineConfig | None = None, classifier: FrameClassifier | None = None,
                 hears_audio: bool = True, noise: NoiseSource | None = None,
                 conversation_id: str | None = None, turn_judge: TurnJudge | JudgeThread | None = None) -> None:
        """`turn_judge`: the end-of-turn detector (shared: a JudgeThread runs it for many conversations)."""
        self.id = conversation_id or f"conv-{next(_IDS)}"
        self.assistant, self.output, self.worker, self.store = assistant, output, worker, store
        self.config = config or EngineConfig()
        self._judge = turn_judge if isinstance(turn_judge, JudgeThread) or turn_judge is None else JudgeThread(turn_judge)
        if hears_audio:  # typed turns only: no pause to judge
            check_turn_end(self.config.turn_end, self._judge)
        self.conversation = conversation if conversation is not None else assistant.new_conversation()
        self.listener = assistant.listener() if self.config.streaming and hears_audio else None
        self._classifier = classifier
        self.segmenter = self._segmenter(self.config) if hears_audio else None
        self._pending_settings: TurnSettings | None = None
        self._judge_failures = 0
        self._spec: Job | None = None  # the speculative answer under way (the input side's view)
        self.speculation = SpeculationStats()
        self._voice_end_at: float | None = None  # perf_counter of the last voiced frame pushed
        self.events: queue.Queue[object | None] = queue.Queue()  # the view's; a None sentinel ends them
        self._consumers = [self.events]
        self._error: GlmVoiceError | None = None  # the first failure, under _state_lock
        self._state = ChatState.IDLE
        self._state_lock = threading.Lock()
        self._input_lock = threading.Lock()  # one caller at a time feeds the segmenter
        self._jobs: queue.Queue[Job | Heard | Truncation | object] = queue.Queue()
        self._open: list[Job] = []  # turns queued or running, not yet finished (under _play_lock)
        self._turns = 0  # turns submitted so far (under _play_lock)
        self.last_turn_error: LMServerError | None = None
        self._play_lock = threading.Lock()  # output writes vs. barge-in flushes
        self._stop = threading.Event()
        self._done = threading.Event()
        self._level, self._blocks = 0.0, 0
        self._kind = KIND_IDLE
        self.runner = TurnRunner(self, noise)
        self._writer = SessionWriter(store, self.subscribe(), self._fail) if store is not None else None
        self._started = False

    # ------------------------------------------------------------------ control

    @property
    def state(self) -> ChatState:
        with self._state_lock:
            return self._state

    @property
    def error(self) -> GlmVoiceError | None:
        """The first failure (its cause chained), or None."""
        with self._state_lock:
            return self._error

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def reports(self) -> list[object]:
        return self.runner.reports  # type: ignore[return-value]

    def subscribe(self) -> queue.Queue[object | None]:
        """A queue of every event from now on, ended by None; call it before start()."""
        consumer: queue.Queue[object | None] = queue.Queue()
        self._consumers.append(consumer)
        return consumer

    def start(self) -> None:
        """Hand the conversation to the worker (and start the session writer)."""
        if self._started:
            return
        self._started = True
        if self._writer is not None:
            self._writer.start()
        self._set_state(ChatState.LISTENING)
        self.worker.add(self)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the conversation has ended (input done and answered, stopped, or failed)."""
        return self._done.wait(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the session writer (it saves what the worker finished)."""
        if self._writer is not None:
            self._writer.join(timeout)

    def stop(self) -> None:
        """Cut the running answer (it is saved as interrupted) and end the conversation."""
        self._stop.set()
        spec = self._spec
        if spec is not None:
            spec.cancel.set()
        with self._play_lock:
            for job in list(self._open):
                job.stopped = True
                job.cancel.set()
            self.output.flush()
        self.worker.wake()

    def end_input(self) -> None:
        """No more input: the conversation ends once the queued turns are answered."""
        self._put(END)

    # ------------------------------------------------------------------ input (any thread)

    def push_audio(self, block: np.ndarray) -> None:
        """Microphone frames (n,) float32 at 16 kHz, in order; their position is counted from the first."""
        if self.segmenter is None:
            raise UsageError("this conversation was made without audio input")
        with self._input_lock:
            self._blocks += 1
            self._level = float(np.sqrt(np.mean(np.square(block, dtype=np.float64)))) if len(block) else 0.0
            if self._blocks % LEVEL_EVERY_BLOCKS == 0:
                self._emit(StatusChanged(self.state, self._level))
            voiced = self.segmenter.state.last_voiced_end
            events = self.segmenter.push(block)
            if self.segmenter.state.last_voiced_end != voiced:
                self._voice_end_at = time.perf_counter()
            for event in events:
                self._on_segment(event)
            self._apply_settings()

    @property
    def input_samples(self) -> int:
        """Samples pushed so far (whole VAD frames): the position of the next one on the input timeline."""
        return 0 if self.segmenter is None else self.segmenter.state.position

    def commit(self) -> None:
        """End the user's turn now (push-to-talk, or an input that has ended): answer what was said."""
        if self.segmenter is None:
            return
        with self._input_lock:
            for event in self.segmenter.finish():
                self._on_segment(event)
            self._apply_settings()

    def end_audio(self) -> None:
        """The audio input has ended: its turn in progress is the last, then the conversation ends."""
        self.commit()
        self.end_input()

    def type_text(self, text: str, interrupt: bool = False) -> int | None:
        """Queue a typed turn (answered in speech, like a spoken one); its turn number (None: blank text).

        `interrupt`: the line was sent with Enter by someone at the keyboard, which cuts the answer under way as
        speech does (unless barge-in is off); a typed turn that has to wait is announced (`TypedQueued`).
        """
        if not text.strip():
            return None
        if interrupt and self.config.barge_in:
            self._barge_in(None)
        job = Job(text=text.strip(), heard_at=time.perf_counter())
        with self._play_lock:
            waits = bool(self._open)
        self._register(job)
        if waits:  # said before the model can take it, so the view never shows a turn as waiting after it began
            self._emit(TypedQueued(job.text or "", turn=job.turn))
        self._put(job)
        return job.turn

    def submit_audio(self, samples: np.ndarray) -> int:
        """Queue a whole spoken turn, (n,) float32 at 16 kHz, that the transport collected itself (push-to-talk:
        no VAD decides where it ends); its turn number."""
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if len(samples) == 0:
            raise UsageError("an empty spoken turn cannot be answered")
        now = time.perf_counter()
        job = Job(samples=samples, heard_at=now, voice_end_at=now)
        self._submit(job)
        return job.turn

    def interrupt(self) -> None:
        """Cut the answer under way (saved as interrupted, trimmed to what was heard) and silence the output."""
        self._barge_in(None)

    def truncate(self, turn: int, heard_ms: float) -> None:
        """The user heard the first `heard_ms` of turn `turn`'s answer: the history keeps only that.

        An answer still open is cut there; one already finished is trimmed if it is the last answer.
        """
        if not heard_ms >= 0:
            raise UsageError(f"heard time must be a non-negative number of milliseconds, not {heard_ms}")
        heard = round(heard_ms * self.output.sample_rate / MS_PER_SECOND)
        with self._play_lock:
            job = next((j for j in self._open if j.turn == turn), None)
            if job is not None:
                job.heard = heard
                job.cancel.set()
                return
        self._put(Truncation(turn, heard))

    def update(self, settings: TurnSettings) -> None:
        """New turn-taking settings: generation's at once (the next answer), the others once no user turn is
        in progress (a turn is cut by one VAD config); settings still waiting are merged, the newest winning."""
        from dataclasses import fields, replace

        if settings.turn_end is not None and self.segmenter is not None:
            check_turn_end(settings.turn_end, self._judge)
        with self._input_lock:
            if settings.generation is not None:
                self.config = replace(self.config, generation=settings.generation)
            waiting = self._pending_settings or TurnSettings()
            merged = {f.name: getattr(settings, f.name) if getattr(settings, f.name) is not None
                      else getattr(waiting, f.name) for f in fields(TurnSettings) if f.name != "generation"}
            self._pending_settings = TurnSettings(**merged)
            self._apply_settings()

    def clear_input(self) -> None:
        """Forget the user's turn in progress: its audio so far is dropped and nothing is answered."""
        if self.segmenter is None:
            return
        with self._input_lock:
            self._drop_speculation()
            self.segmenter.reset(self.segmenter.state.position)
            self._apply_settings()

    def backlog_s(self) -> float:
        """Seconds of heard audio queued for the model work and not yet taken (input sent faster than the
        worker can listen)."""
        with self._jobs.mutex:
            samples = sum(len(item.samples) for item in self._jobs.queue if isinstance(item, Heard))
        return samples / self.config.vad.sample_rate

    # ------------------------------------------------------------------ the input side

    def _speculates(self, config: EngineConfig) -> bool:
        return bool(config.speculative_pause_ms) and not config.transcribe_user

    def _segmenter(self, config: EngineConfig) -> Segmenter:
        """The segmenter of `config`; with the smart detector it pauses at the speculative pause (or the
        default one when speculation is off) and ends on silence only after the longest pause."""
        smart = config.turn_end.smart
        pause = config.speculative_pause_ms if self._speculates(config) else None
        if smart:
            pause = pause or SPECULATIVE_PAUSE_MS
        segmenter = Segmenter(turn_vad(config.vad, config.turn_end), self._classifier,
                              stream_turns=self.listener is not None, pause_ms=pause)
        self._policy = TurnEndPolicy(segmenter, config.turn_end)
        return segmenter

    def _apply_settings(self) -> None:
        """Under _input_lock: settings wait for the end of a user turn (a turn is cut by one config)."""
        settings = self._pending_settings
        if settings is None or (self.segmenter is not None and self.segmenter.in_turn):
            return
        from dataclasses import replace

        self._pending_settings = None
        config = self.config
        if settings.vad is not None:
            config = replace(config, vad=settings.vad)
        if settings.barge_in is not None:
            config = replace(config, barge_in=settings.barge_in)
        if settings.speculative_pause_ms is not None:
            config = replace(config, speculative_pause_ms=settings.speculative_pause_ms or None)
        if settings.turn_end is not None:
            config = replace(config, turn_end=settings.turn_end)
        self.config = config
        if self.segmenter is not None:
            position = self.segmenter.state.position
            self.segmenter = self._segmenter(config)
            self.segmenter.reset(position)

    def _on_segment(self, event: object) -> None:
        if isinstance(event, TurnAudio):
            self._put(Heard(event.turn_start, event.samples))
        elif isinstance(event, SpeechPaused):
            if self._speculates(self.config):
                self._speculate(event.utterance)
            if self.config.turn_end.smart:
                self._judge_pause(event.utterance)
        elif isinstance(event, SpeechResumed):
            self._drop_speculation()
        elif isinstance(event, SpeechStarted):
            self._emit(UserTurnStarted(at_sample=event.at_sample))
            if self.config.barge_in:
                self._barge_in(event)
        elif isinstance(event, Utterance):
            if self.config.barge_in:
                self._barge_in(None)  # a turn that goes on after a max-length cut
            voice_end = self.segmenter.state.last_voiced_end if self.segmenter else None
            job = self._confirm(event, voice_end, self.input_samples)
            if job is None:
                job = Job(samples=event.samples, end_sample=event.end_sample, heard_at=time.perf_counter(),
                          turn_start=event.start_sample, voice_end_at=self._voice_end_at,
                          voice_end_sample=voice_end, confirmed_sample=self.input_samples)
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
        job = Job(samples=utterance.samples, end_sample=utterance.end_sample, turn_start=utterance.start_sample,
                  voice_end_at=self._voice_end_at, speculative=True)
        self._spec = job
        self.speculation.started += 1
        self._put(job)
        if self.config.lockstep:
            self._wait_lockstep(job.idle)

    def _judge_pause(self, utterance: Utterance) -> None:
        """Ask the detector whether the turn is complete: at once on a virtual clock (reproducible), else on
        the judge thread while the input goes on; a complete turn ends at the pause (`_judged`)."""
        assert self._judge is not None  # check_turn_end: smart needs a judge
        request, policy = self._policy.request(utterance), self._policy
        if self.config.lockstep:
            self._judged(policy, request, self._judge.decide(request.samples))
            return

        def done(result: Judgement | Exception) -> None:
            with self._input_lock:
                self._judged(policy, request, result)
                self._apply_settings()

        self._judge.submit(request.samples, done)

    def _judged(self, policy: TurnEndPolicy, request: PauseRequest, result: Judgement | Exception) -> None:
        """Under _input_lock: end the turn if it is complete and still paused (the segmenter not replaced)."""
        if isinstance(result, Exception):
            self._judge_failures += 1
            if self._judge_failures == 1:
                log.warning("the end-of-turn detector failed (%s); turns end on silence", result)
            return
        ended, events = (False, []) if policy is not self._policy else policy.decide(request, result.probability)
        self._emit(TurnJudged(result.probability, ended, result.seconds, request.at_sample))
        for event in events:
            self._on_segment(event)

    def _drop_speculation(self) -> None:
        spec, self._spec = self._spec, None
        if spec is not None:
            spec.cancel.set()
            self.worker.wake()

    def _confirm(self, utterance: Utterance, voice_end: int | None, confirmed: int) -> Job | None:
        """The end of turn: the speculative answer of this very utterance, if one is under way, plays now."""
        spec, self._spec = self._spec, None
        if spec is None:
            return None
        spec.voice_end_sample, spec.confirmed_sample = voice_end, confirmed
        same = (not utterance.truncated and spec.turn_start == utterance.start_sample
                and spec.end_sample == utterance.end_sample)
        with self._play_lock:  # against the worker shedding it at this moment
            usable = same and not spec.failed and not spec.shed
            spec.claimed = usable
        if not usable:
            spec.cancel.set()
            return None
        spec.heard_at = time.perf_counter()
        self.speculation.confirmed += 1
        self._register(spec)  # only now is it a turn: numbered, its audio saved, open to barge-in
        spec.confirmed.set()
        self.worker.wake()
        return spec

    def _barge_in(self, onset: SpeechStarted | None) -> None:
        """Cut every open turn and silence the output at once."""
        with self._play_lock:
            playing = self.output.pending > 0
            open_jobs = [job for job in self._open
                         if not job.cancel.is_set() and (playing or not job.generated.is_set())]
            if not open_jobs:
                return
            for job in open_jobs:
                job.barge_in = onset
                job.cancel.set()
            self.output.flush()
            base = open_jobs[0].base_played
            played = 0 if base is None else self.output.played - base
        self.worker.wake()
        self._set_state(ChatState.INTERRUPTED)
        self._emit(Interrupted(played_s=max(played, 0) / self.output.sample_rate, turn=open_jobs[0].turn))

    def _submit(self, job: Job) -> None:
        """Number the turn, hand spoken audio to the store's writer at once, queue it for the model."""
        self._register(job)
        self._put(job)

    def _register(self, job: Job) -> None:
        with self._play_lock:
            self._turns += 1
            job.turn = self._turns
            self._open.append(job)
        if self.store is not None:
            if job.samples is not None:
                job.audio_path = self.store.audio_name("user")
            # the answer's name now, not when it ends: a later turn's speech comes after it
            job.answer_audio_path = self.store.audio_name("assistant")
        if job.samples is not None:
            self._emit(UserAudio(job.turn, job.samples, self.config.vad.sample_rate, job.audio_path,
                                 at_sample=job.turn_start))

    def _put(self, item: object) -> None:
        self._jobs.put(item)
        self.worker.wake()

    # ------------------------------------------------------------------ the worker's side

    def priority(self) -> tuple[float, ...]:
        """The worker's sort key: the kind of work, then the seconds of audio left to play."""
        return (self._kind, self.output.pending / self.output.sample_rate)

    def crashed(self, error: BaseException) -> None:
        self._fail(engine_error(error) if isinstance(error, Exception) else GlmVoiceError(str(error)))
        self._close()

    def steps(self) -> Generator[str, None, None]:
        """The conversation's model work, unit by unit, for the worker (see `chat.worker`)."""
        try:
            while True:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    if self._stop.is_set():
                        break
                    self._kind = KIND_IDLE
                    yield WAIT
                    continue
                if isinstance(item, Heard):
                    if not self._stop.is_set():
                        self._kind = KIND_LISTEN
                        yield from self.runner.hear(item)
                        yield READY
                    continue
                if isinstance(item, Truncation):
                    self.runner.truncate_finished(item)
                    continue
                if not isinstance(item, Job) or self._stop.is_set():
                    break
                yield from self.runner.run(item)
        except GlmVoiceError as e:
            self._fail(e)
        except Exception as e:  # noqa: BLE001 - a bug or a torch error: end cleanly and say what it was
            self._fail(engine_error(e))
        finally:
            self.assistant.lm.release(self.conversation)  # its cache (or static slot) is free at once
            self._close()

    def set_kind(self, kind: int) -> None:
        self._kind = kind

    def loaded(self) -> bool:
        """Other conversations' confirmed answers are waiting for the worker (speculation gives way)."""
        return self.worker.others_urgent(self)

    def wake(self) -> None:
        """Something this conversation waits on has arrived (a remote LM's token): ask the worker again."""
        self.worker.wake()

    def answer_queued(self, turn_start: int) -> bool:
        """An answer to the turn that began at `turn_start` waits in the queue (speculative or confirmed)."""
        with self._jobs.mutex:  # the queue's own lock: the input side may be putting
            return any(isinstance(job, Job) and job.turn_start == turn_start for job in self._jobs.queue)

    def _close(self) -> None:
        if self._done.is_set():
            return
        with self._play_lock:
            for job in self._open:
                job.generated.set()  # never leave a lockstep caller waiting
        self._set_state(ChatState.IDLE)
        self._done.set()
        self._stop.set()
        for consumer in self._consumers:
            consumer.put(None)

    # ------------------------------------------------------------------ shared

    def _emit(self, event: object) -> None:
        if isinstance(event, Tagged) and event.conversation is None:
            object.__setattr__(event, "conversation", self.id)  # stamped once, before anyone sees it
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
            self._emit(Failed(one_line(error)))
        self.stop()
