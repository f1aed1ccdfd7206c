"""The session writer: saves a chat's turns from the engine's events, on a thread of its own.

The model thread never waits on the disk: the engine only emits events (UserAudio at the end of the
user's speech, UserUtterance once the LM has taken the turn, AssistantTurn when the answer ends), and
this thread writes and fsyncs them in order. The user's speech is saved as soon as it ends, while the
model is still thinking, so a crash, a signal or a kill after these few milliseconds loses nothing said.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from glmvoice_cli.errors import GlmVoiceError
from glmvoice_cli.events import AnswerTruncated, AssistantTurn, UserAudio, UserUtterance

if TYPE_CHECKING:
    from glmvoice_cli.sessions.store import AudioFile, SessionStore

WAIT_S = 0.05  # longest wait for an event, so a writer never blocks without a timeout


class SessionWriter:
    """Reads engine events from `events` until a None sentinel and appends the turns to `store`.

    Errors (a full disk, a removed folder) go to `on_error`; the writer keeps reading so that the
    engine never blocks on it, and what can still be saved is.
    """

    def __init__(self, store: SessionStore, events: queue.Queue[object],
                 on_error: Callable[[GlmVoiceError], None]) -> None:
        self.store, self.events, self.on_error = store, events, on_error
        self._audio: dict[int, AudioFile | None] = {}  # turn -> its saved speech, until its line is written
        self._thread = threading.Thread(target=self._loop, name="glmvoice-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            try:
                event = self.events.get(timeout=WAIT_S)
            except queue.Empty:
                continue
            if event is None:
                return
            try:
                self.save(event)
            except GlmVoiceError as e:
                self.on_error(e)

    def save(self, event: object) -> None:
        """Write what `event` carries (other events are ignored)."""
        if isinstance(event, UserAudio):
            self._audio[event.turn] = None  # a failed write leaves the turn without audio, not lost
            self._audio[event.turn] = self.store.save_audio("user", event.samples, event.sample_rate,
                                                            event.audio_path)
        elif isinstance(event, UserUtterance) and event.turn is not None:
            self.store.append_user(None, text=event.text, token_ids=event.token_ids,
                                   audio=self._audio.pop(event.turn, None))
        elif isinstance(event, AnswerTruncated):
            self.store.amend_last_answer(event.token_ids, event.text, event.heard_samples)
        elif isinstance(event, AssistantTurn):
            audio, failed = self._save_answer_audio(event)
            self.store.append_assistant(None, text=event.text, token_ids=event.token_ids,
                                        interrupted=event.interrupted, timings=event.timings,
                                        sample_rate=event.sample_rate, reason=event.reason, audio=audio)
            if failed is not None:
                raise failed

    def _save_answer_audio(self, event: AssistantTurn) -> tuple[AudioFile | None, GlmVoiceError | None]:
        """The answer's saved audio, or None and the error: its line (text, ids) is saved either way."""
        try:
            return self.store.save_audio("assistant", event.samples, event.sample_rate, event.audio_path), None
        except GlmVoiceError as e:
            return None, e
