"""The local transport: a microphone (or a file) and a speaker around one conversation core.

    capture thread:  source.read -> echo canceller -> ConversationCore.push_audio
    model worker:    the core's units (tokenize, prefill, tokens, decoder blocks) -> the speaker (the sink)

The conversation itself (turn-taking, barge-in, speculation, trimming to what was heard, events) is the
`chat.core.ConversationCore`; its model work runs on a `chat.worker.ModelWorker`, this engine's own unless
one is given (then several engines, or a server's conversations, share it). What was heard is the
speaker's played count. With a SessionStore, the core's writer thread saves the turns from its events.

`lockstep=True` is for a source on a VirtualClock (tests, `--input-file` without `--realtime`): the
capture thread waits until each answer is fully generated before it reads on (see `chat.core`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from glmvoice_cli.audio.echo import NullEchoCanceller
from glmvoice_cli.audio.playback import VirtualClock
from glmvoice_cli.chat.answer import TurnReport, engine_error
from glmvoice_cli.chat.core import ConversationCore
from glmvoice_cli.chat.settings import TURN_TRANSCRIPT_MAX_TOKENS, EngineConfig
from glmvoice_cli.chat.worker import ModelWorker
from glmvoice_cli.errors import GlmVoiceError

if TYPE_CHECKING:
    import queue

    from glmvoice_cli.audio.devices import AudioSink, AudioSource
    from glmvoice_cli.audio.echo import EchoCanceller
    from glmvoice_cli.audio.end_of_turn import TurnJudge
    from glmvoice_cli.audio.playback import Clock
    from glmvoice_cli.audio.vad import FrameClassifier
    from glmvoice_cli.events import ChatState
    from glmvoice_cli.pipeline import Conversation
    from glmvoice_cli.pipeline.assistant import Assistant
    from glmvoice_cli.pipeline.listening import SpeculationStats, TurnListener
    from glmvoice_cli.sessions.store import SessionStore

__all__ = ["TURN_TRANSCRIPT_MAX_TOKENS", "ChatEngine", "EngineConfig", "TurnReport"]

READ_TIMEOUT_S = 0.1  # longest wait on the source, so stop() is noticed quickly
POLL_S = 0.01
IDLE_TICK_S = 0.03  # virtual time advanced per wait once the source has ended
JOIN_TIMEOUT_S = 10.0  # how long join() waits for a thread that is inside a model call


class ChatEngine:
    """Runs a conversation between `source` (None: typed turns only) and `sink`; see the module docstring."""

    def __init__(self, assistant: Assistant, source: AudioSource | None, sink: AudioSink, *,
                 store: SessionStore | None = None, conversation: Conversation | None = None,
                 echo: EchoCanceller | None = None, config: EngineConfig | None = None,
                 classifier: FrameClassifier | None = None, clock: Clock | None = None,
                 worker: ModelWorker | None = None, turn_judge: TurnJudge | None = None) -> None:
        self.assistant, self.source, self.sink, self.store = assistant, source, sink, store
        self.echo = echo or NullEchoCanceller()
        self.clock = clock
        self._owns_worker = worker is None
        self.worker = worker if worker is not None else ModelWorker(prepare=assistant.prepare_thread)
        self.core = ConversationCore(assistant, sink, self.worker, store=store, conversation=conversation,
                                     config=config, classifier=classifier, hears_audio=source is not None,
                                     turn_judge=turn_judge)
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ the core's face

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @config.setter
    def config(self, config: EngineConfig) -> None:
        self.core.config = config

    @property
    def listener(self) -> TurnListener | None:
        return self.core.listener

    @property
    def events(self) -> queue.Queue[object | None]:
        return self.core.events

    @property
    def conversation(self) -> Conversation:
        return self.core.conversation

    @property
    def reports(self) -> list[TurnReport]:
        return self.core.runner.reports

    @property
    def speculation(self) -> SpeculationStats:
        return self.core.speculation

    @property
    def state(self) -> ChatState:
        return self.core.state

    @property
    def error(self) -> GlmVoiceError | None:
        return self.core.error

    @property
    def last_turn_error(self) -> GlmVoiceError | None:
        return self.core.last_turn_error

    @property
    def stopped(self) -> bool:
        return self.core.stopped

    def subscribe(self) -> queue.Queue[object | None]:
        return self.core.subscribe()

    def type_text(self, text: str, interrupt: bool = False) -> None:
        self.core.type_text(text, interrupt)

    def end_input(self) -> None:
        self.core.end_input()

    def stop(self) -> None:
        self.core.stop()

    def wait(self, timeout: float | None = None) -> bool:
        return self.core.wait(timeout)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        self.core.start()
        if self._owns_worker:
            self.worker.start()
        if self.source is not None:
            thread = threading.Thread(target=self._capture_loop, name="glmvoice-capture", daemon=True)
            self._threads.append(thread)
            thread.start()

    def join(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Wait for the capture thread and the model work, the session writer last."""
        for thread in self._threads:
            thread.join(timeout)
        if self._owns_worker:
            if self.core.wait(timeout):
                self.worker.stop()
            self.worker.join(timeout)
        self.core.join(timeout)

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

    def _capture_loop(self) -> None:
        assert self.source is not None
        core = self.core
        try:
            while not core.stopped:
                block = self.source.read(READ_TIMEOUT_S)
                if block is None:
                    break
                if len(block) == 0:
                    continue
                core.push_audio(self.echo.process(block))
            if not core.stopped:
                core.commit()
        except GlmVoiceError as e:
            core._fail(e)
            return
        except Exception as e:  # noqa: BLE001 - a capture thread that dies silently would leave the chat waiting
            core._fail(engine_error(e))  # forever: end it with one line (the cause kept for --debug)
            return
        core.end_input()
        self._idle_until_done()

    def _idle_until_done(self) -> None:
        """Input ended: let the queued answers play out (advancing a virtual clock ourselves)."""
        clock = self.clock if isinstance(self.clock, VirtualClock) else None  # nobody else moves it
        while not self.core.wait(0 if clock is not None else POLL_S):
            if clock is not None:
                clock.advance(IDLE_TICK_S)
                if self.sink.pending == 0:
                    self.core.wait(POLL_S)
