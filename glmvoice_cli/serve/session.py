"""One Realtime API connection: client events drive a `ConversationCore`, its events become server events.

    client JSON -> handle() -> core.push_audio / commit / submit_audio / type_text / interrupt / truncate
    core events -> the pump thread -> _on_core_event() -> server JSON -> send()

No socket here: `send` is a callable the transport gives (thread-safe, order-keeping), so a test can drive
a session with plain dicts. One lock orders everything sent, whichever thread sends it.

Turn detection `server_vad` feeds the audio to the core's segmenter (speculative start, streaming prefill and
barge-in as in `glmvoice chat`); `null` (push-to-talk) buffers it here until `input_audio_buffer.commit`, and
`response.create` answers the items committed since the last response.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from glmvoice_cli.audio.end_of_turn import JudgeThread, TurnEndConfig
from glmvoice_cli.audio.vad import VadConfig
from glmvoice_cli.chat.core import ConversationCore, EngineConfig, TurnSettings
from glmvoice_cli.config import SAMPLE_RATE_IN
from glmvoice_cli.events import (
    AssistantTurn,
    AudioChunk,
    Failed,
    TextDelta,
    TurnEnded,
    UserAudio,
    UserTurnStarted,
    UserUtterance,
)
from glmvoice_cli.files import loads_json
from glmvoice_cli.serve.protocol import (
    EAGERNESS,
    WIRE_RATE,
    ProtocolError,
    SessionSettings,
    apply_session_update,
    decode_pcm16,
    encode_pcm16,
    error_event,
    event_id,
    ms_of,
    new_id,
    user_text,
)
from glmvoice_cli.serve.wire_audio import ClientPlayback, WireInput, WireOutput

if TYPE_CHECKING:
    from collections.abc import Callable

    from glmvoice_cli.chat.worker import ModelWorker
    from glmvoice_cli.pipeline import GenerationOptions
    from glmvoice_cli.pipeline.assistant import Assistant
    from glmvoice_cli.sessions.store import SessionStore

MAX_BUFFER_S = 120.0  # push-to-talk audio held before a commit
MAX_BACKLOG_S = 60.0  # server VAD: heard audio waiting for the model work (a client far ahead of it)
AUDIO_FORMAT = {"type": "audio/pcm", "rate": WIRE_RATE}
CLOSE = object()  # given to `send` when the conversation has ended (a fatal failure): close the socket

_STATUS = {  # TurnEnded.reason -> (status, reason)
    "done": ("completed", None),
    "max_tokens": ("incomplete", "max_output_tokens"),
    "context_full": ("incomplete", "max_output_tokens"),
    "barge_in": ("cancelled", "turn_detected"),
    "cancelled": ("cancelled", "client_cancelled"),
    "error": ("failed", None),
}


@dataclass
class _Response:
    """One answer as the client sees it."""

    id: str
    item_id: str
    turn: int
    text_only: bool
    started: bool = False  # output item and content part announced
    output: WireOutput = field(default_factory=WireOutput)
    sent: int = 0  # wire samples sent
    text: list[str] = field(default_factory=list)
    heard_text: str | None = None  # AssistantTurn.text: what the history keeps of it
    client_cancelled: bool = False


@dataclass
class _Pending:
    """A user item committed or created, not yet answered (push-to-talk, or typed)."""

    item_id: str
    samples: np.ndarray | None = None
    text: str | None = None


class RealtimeSession:
    """See the module docstring. `start()`, then `handle()` each client message; `close()` at the end."""

    def __init__(self, assistant: Assistant, worker: ModelWorker, send: Callable[[object], None], *,
                 generation: GenerationOptions, store: SessionStore | None = None,
                 session_id: str | None = None, turn_judge: JudgeThread | None = None) -> None:
        """`turn_judge`: the server's end-of-turn detector, for `semantic_vad` (None: only server_vad)."""
        self.id = session_id or new_id("sess")
        self._send_raw = send
        self._lock = threading.RLock()
        self.settings = SessionSettings()
        self._base_generation = generation
        self.playback = ClientPlayback()
        vad = self._vad_config(self.settings)
        config = EngineConfig(vad=vad, generation=self._generation(self.settings),
                              turn_end=self._turn_end(self.settings))
        self._judge = turn_judge
        self.core = ConversationCore(assistant, self.playback, worker, store=store, config=config,
                                     conversation_id=self.id, turn_judge=turn_judge)
        self._events = self.core.subscribe()
        self._input = WireInput()
        self._buffer: list[np.ndarray] = []  # push-to-talk audio, 16 kHz
        self._buffered = 0
        self._pending: list[_Pending] = []
        self._responses: dict[int, _Response] = {}  # turn -> its open response
        self._answered: dict[str, _Response] = {}  # assistant item id -> its response (kept for truncate)
        self._turn_items: dict[int, list[str]] = {}  # turns submitted here -> their user item ids
        self._speech_item: str | None = None  # server VAD: the item of the speech under way
        self._last_item: str | None = None
        self._pump = threading.Thread(target=self._pump_events, name=f"glmvoice-{self.id}", daemon=True)

    # ------------------------------------------------------------------ lifetime

    def start(self) -> None:
        with self._lock:
            self._send({"type": "session.created", "session": self.settings.as_json(self.id)})
        self.core.start()
        self._pump.start()

    def close(self) -> None:
        """The client has gone (or the server is stopping): cut the answer, free the conversation."""
        self.core.stop()

    def join(self, timeout: float | None = None) -> None:
        self._pump.join(timeout)
        self.core.join(timeout)

    # ------------------------------------------------------------------ client events

    def handle(self, message: str | bytes) -> None:
        """One client message; a bad one is answered with an `error` event and the session goes on."""
        client_id = None
        try:
            try:
                event = loads_json(message)
            except ValueError:  # UnicodeDecodeError and too deep nesting included
                raise ProtocolError("the message is not valid JSON", code="invalid_json") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ProtocolError("an event must be a JSON object with a 'type'", code="invalid_event")
            client_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = _HANDLERS.get(event["type"])
            if handler is None:
                raise ProtocolError(f"unknown or unsupported event type '{event['type'][:80]}'",
                                    code="unsupported_event", param="type")
            with self._lock:
                handler(self, event)
        except ProtocolError as e:
            with self._lock:
                self._send(error_event(e, client_id))

    def handle_error(self, error: ProtocolError) -> None:
        """A message refused before it was read (too large): an `error` event, the session goes on."""
        with self._lock:
            self._send(error_event(error))

    def _session_update(self, event: dict[str, Any]) -> None:
        settings = apply_session_update(self.settings, event.get("session"))
        if settings.turn_detection is not None and settings.turn_detection.semantic and self._judge is None:
            raise ProtocolError("semantic_vad needs the Smart Turn model on the server (glmvoice models download "
                                "turn); use server_vad", code="unsupported", param="session.turn_detection.type")
        before = self.settings
        self.settings = settings
        vad_changed = settings.turn_detection != before.turn_detection
        if vad_changed and before.turn_detection is not None and settings.turn_detection is None:
            self.core.clear_input()  # a spoken turn half-heard by the old VAD is not carried into push-to-talk
        td = settings.turn_detection
        self.core.update(TurnSettings(
            vad=self._vad_config(settings) if vad_changed else None,
            turn_end=self._turn_end(settings) if vad_changed else None,
            barge_in=None if td is None else td.interrupt_response,
            generation=self._generation(settings)))
        self._send({"type": "session.updated", "session": settings.as_json(self.id)})

    def _append(self, event: dict[str, Any]) -> None:
        samples = self._input(decode_pcm16(event.get("audio"), "audio"))
        if self.settings.turn_detection is None:
            if (self._buffered + len(samples)) / SAMPLE_RATE_IN > MAX_BUFFER_S:
                raise ProtocolError(f"the input audio buffer holds at most {MAX_BUFFER_S:.0f} s: commit or clear it "
                                    "(this chunk was dropped)", code="input_audio_buffer_full")
            self._buffer.append(samples)
            self._buffered += len(samples)
            return
        if self.core.backlog_s() > MAX_BACKLOG_S:
            raise ProtocolError(f"more than {MAX_BACKLOG_S:.0f} s of audio is waiting to be heard: send it no faster "
                                "than the server listens (this chunk was dropped)", code="input_audio_buffer_full")
        self.core.push_audio(samples)

    def _commit(self, event: dict[str, Any]) -> None:
        if self.settings.turn_detection is not None:
            self.core.commit()  # the turn in progress ends now and is answered
            return
        if self._buffered == 0:
            raise ProtocolError("the input audio buffer is empty: nothing to commit",
                                code="input_audio_buffer_commit_empty")
        samples = np.concatenate([*self._buffer, self._input.finish()])
        self._buffer, self._buffered = [], 0
        item = _Pending(new_id("item"), samples=samples)
        self._pending.append(item)
        self._send({"type": "input_audio_buffer.committed", "item_id": item.item_id,
                    "previous_item_id": self._last_item})
        self._added(self._user_item(item.item_id, audio=True))

    def _clear(self, event: dict[str, Any]) -> None:
        self._buffer, self._buffered = [], 0
        self._input.reset()
        self.core.clear_input()
        self._send({"type": "input_audio_buffer.cleared"})

    def _item_create(self, event: dict[str, Any]) -> None:
        text = user_text(event.get("item"))
        item_id = event["item"].get("id")
        if not isinstance(item_id, str) or not item_id or len(item_id) > 64:
            item_id = new_id("item")
        item = _Pending(item_id, text=text)
        self._pending.append(item)
        self._added(self._user_item(item.item_id, text=text))

    def _item_delete(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        found = next((p for p in self._pending if p.item_id == item_id), None)
        if found is None:
            raise ProtocolError("only a user item not yet answered can be deleted: the model's history is built "
                                "on the answered ones", code="unsupported", param="item_id")
        self._pending.remove(found)
        self._send({"type": "conversation.item.deleted", "item_id": item_id})

    def _item_truncate(self, event: dict[str, Any]) -> None:
        item_id, heard_ms = event.get("item_id"), event.get("audio_end_ms")
        if item_id not in self._answered:
            raise ProtocolError("no answer with this item_id (truncate applies to assistant audio items)",
                                code="item_not_found", param="item_id")
        if event.get("content_index", 0) != 0:
            raise ProtocolError("the answer has one content part: content_index must be 0", param="content_index")
        turn, sent = self._answered[item_id].turn, self._answered[item_id].sent
        if isinstance(heard_ms, bool) or not isinstance(heard_ms, int) or heard_ms < 0:
            raise ProtocolError("'audio_end_ms' must be a non-negative integer", param="audio_end_ms")
        if heard_ms > ms_of(sent, WIRE_RATE):
            raise ProtocolError(f"'audio_end_ms' {heard_ms} is past the end of the audio sent "
                                f"({ms_of(sent, WIRE_RATE)} ms)", param="audio_end_ms")
        self.core.truncate(turn, float(heard_ms))
        self._send({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                    "audio_end_ms": heard_ms})

    def _response_create(self, event: dict[str, Any]) -> None:
        options = event.get("response") or {}
        if not isinstance(options, dict):
            raise ProtocolError("'response' must be an object", param="response")
        unsupported = set(options) - {"metadata", "output_modalities", "conversation", "audio"}
        if unsupported or options.get("conversation", "auto") != "auto":
            name = min(unsupported) if unsupported else "conversation"
            raise ProtocolError(f"response.{name} is not supported", code="unsupported", param=f"response.{name}")
        modalities = options.get("output_modalities", self.settings.output_modalities)
        if modalities not in (["audio"], ["text"]):
            raise ProtocolError("output_modalities must be [\"audio\"] or [\"text\"]",
                                param="response.output_modalities")
        if self._responses:
            raise ProtocolError("a response is already in progress: cancel it first",
                                code="conversation_already_has_active_response")
        if not self._pending:
            raise ProtocolError("nothing to answer: commit audio or create a user message first",
                                code="no_user_input")
        pending, self._pending = self._pending, []
        kinds = {p.samples is None for p in pending}
        if len(kinds) > 1:
            self._pending = pending
            raise ProtocolError("spoken and typed items in one response are not supported: one kind per response",
                                code="unsupported")
        if pending[0].samples is not None:
            turn = self.core.submit_audio(np.concatenate([p.samples for p in pending if p.samples is not None]))
        else:
            typed = self.core.type_text("\n".join(p.text or "" for p in pending))
            assert typed is not None  # the items were checked non-empty
            turn = typed
        self._turn_items[turn] = [p.item_id for p in pending]
        self._open_response(turn, text_only=modalities == ["text"])

    def _response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        open_ = [r for r in self._responses.values() if wanted in (None, r.id)]
        if not open_:
            raise ProtocolError("no response in progress to cancel", code="response_cancel_not_active")
        for response in open_:
            response.client_cancelled = True
        self.core.interrupt()

    # ------------------------------------------------------------------ core events (the pump thread)

    def _pump_events(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                break
            with self._lock:
                self._on_core_event(event)
        with self._lock:
            for response in list(self._responses.values()):  # never leave a client waiting on a response
                self._finish(response, "failed", None, "the conversation ended")
            if self.core.error is not None:
                self._send_raw(CLOSE)

    def _on_core_event(self, event: object) -> None:
        if isinstance(event, UserTurnStarted):
            self._speech_item = new_id("item")
            at = event.at_sample or 0
            self._send({"type": "input_audio_buffer.speech_started", "item_id": self._speech_item,
                        "audio_start_ms": ms_of(at, SAMPLE_RATE_IN)})
        elif isinstance(event, UserAudio):
            if event.turn in self._turn_items:
                return  # committed here (push-to-talk): already announced
            item_id = self._speech_item or new_id("item")
            self._speech_item = None
            end = (event.at_sample or 0) + len(event.samples)
            self._send({"type": "input_audio_buffer.speech_stopped", "item_id": item_id,
                        "audio_end_ms": ms_of(end, SAMPLE_RATE_IN)})
            self._send({"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": self._last_item})
            self._added(self._user_item(item_id, audio=True))
            self._turn_items[event.turn] = [item_id]
            self._open_response(event.turn, text_only=self.settings.output_modalities == ["text"])
        elif isinstance(event, UserUtterance) and event.turn is None and self._speech_item is not None:
            self._send({"type": "input_audio_buffer.speech_stopped", "item_id": self._speech_item,
                        "audio_end_ms": ms_of(self.core.input_samples, SAMPLE_RATE_IN)})
            self._speech_item = None  # too short to be a turn: nothing committed
        elif isinstance(event, TextDelta) and event.turn in self._responses:
            response = self._output_started(self._responses[event.turn])
            response.text.append(event.text)
            kind = "response.output_text.delta" if response.text_only else "response.output_audio_transcript.delta"
            self._send({"type": kind, **self._where(response), "delta": event.text})
        elif isinstance(event, AudioChunk) and event.turn in self._responses:
            response = self._output_started(self._responses[event.turn])
            if not response.text_only:
                self._send_audio(response, response.output(event.samples))
        elif isinstance(event, AssistantTurn) and event.turn in self._responses:
            self._responses[event.turn].heard_text = event.text
        elif isinstance(event, TurnEnded) and event.turn in self._responses:
            response = self._responses[event.turn]
            status, reason = _STATUS.get(event.reason, ("completed", None))
            if status == "cancelled" and response.client_cancelled:
                reason = "client_cancelled"
            self._finish(response, status, reason)
        elif isinstance(event, Failed):
            unstarted = [r for r in self._responses.values() if not r.started]
            if event.recoverable and unstarted:  # a turn refused before it began (too long for the context)
                self._finish(unstarted[0], "failed", None, event.message)
            self._send(error_event(ProtocolError(event.message, code="model_error", kind="server_error")))

    # ------------------------------------------------------------------ responses

    def _open_response(self, turn: int, text_only: bool) -> None:
        response = _Response(new_id("resp"), new_id("item"), turn, text_only)
        self._responses[turn] = response
        self._send({"type": "response.created", "response": self._response_json(response, "in_progress", None)})

    def _output_started(self, response: _Response) -> _Response:
        if response.started:
            return response
        response.started = True
        self._answered[response.item_id] = response
        item = self._assistant_item(response, "in_progress")
        self._send({"type": "response.output_item.added", "response_id": response.id, "output_index": 0,
                    "item": item})
        self._added(item, done=False)
        self._send({"type": "response.content_part.added", **self._where(response), "part": self._part(response)})
        return response

    def _send_audio(self, response: _Response, samples: np.ndarray) -> None:
        if len(samples) == 0:
            return
        response.sent += len(samples)
        self._send({"type": "response.output_audio.delta", **self._where(response), "delta": encode_pcm16(samples)})

    def _finish(self, response: _Response, status: str, reason: str | None, message: str | None = None) -> None:
        del self._responses[response.turn]
        if response.started:
            if not response.text_only and status == "completed":
                self._send_audio(response, response.output.finish())
            transcript = self._transcript(response)
            where = self._where(response)
            if response.text_only:
                self._send({"type": "response.output_text.done", **where, "text": transcript})
            else:
                self._send({"type": "response.output_audio.done", **where})
                self._send({"type": "response.output_audio_transcript.done", **where, "transcript": transcript})
            self._send({"type": "response.content_part.done", **where, "part": self._part(response)})
            item = self._assistant_item(response, "completed" if status == "completed" else "incomplete")
            self._send({"type": "response.output_item.done", "response_id": response.id, "output_index": 0,
                        "item": item})
            self._send({"type": "conversation.item.done", "item": item})
        self._send({"type": "response.done", "response": self._response_json(response, status, reason, message)})

    def _transcript(self, response: _Response) -> str:
        return response.heard_text if response.heard_text is not None else "".join(response.text).strip()

    # ------------------------------------------------------------------ shapes

    def _where(self, response: _Response) -> dict[str, Any]:
        return {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}

    def _part(self, response: _Response) -> dict[str, Any]:
        if response.text_only:
            return {"type": "text", "text": self._transcript(response)}
        return {"type": "audio", "transcript": self._transcript(response)}

    def _assistant_item(self, response: _Response, status: str) -> dict[str, Any]:
        kind = "output_text" if response.text_only else "output_audio"
        content = ({"type": kind, "text": self._transcript(response)} if response.text_only
                   else {"type": kind, "transcript": self._transcript(response)})
        return {"id": response.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": [content]}

    def _user_item(self, item_id: str, audio: bool = False, text: str | None = None) -> dict[str, Any]:
        content = ({"type": "input_audio", "transcript": None} if audio else {"type": "input_text", "text": text})
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
                "content": [content]}

    def _added(self, item: dict[str, Any], done: bool = True) -> None:
        self._send({"type": "conversation.item.added", "previous_item_id": self._last_item, "item": item})
        if done:
            self._send({"type": "conversation.item.done", "previous_item_id": self._last_item, "item": item})
        self._last_item = item["id"]

    def _response_json(self, response: _Response, status: str, reason: str | None,
                       message: str | None = None) -> dict[str, Any]:
        details: dict[str, Any] | None = None
        if status != "in_progress" and status != "completed":
            details = {"type": status, "reason": reason}
            if message is not None:
                details["error"] = {"type": "server_error", "code": "model_error", "message": message}
        output = ([self._assistant_item(response, "completed" if status == "completed" else "incomplete")]
                  if response.started and status != "in_progress" else [])
        modalities = ["text"] if response.text_only else ["audio"]
        return {"id": response.id, "object": "realtime.response", "status": status, "status_details": details,
                "output": output, "conversation_id": self.id, "output_modalities": modalities,
                "max_output_tokens": self.settings.max_output_tokens or "inf", "metadata": None, "usage": None,
                "audio": {"output": {"format": AUDIO_FORMAT, "voice": "glm-4-voice"}}}

    # ------------------------------------------------------------------ settings

    def _vad_config(self, settings: SessionSettings) -> VadConfig:
        td = settings.turn_detection
        if td is None:
            return VadConfig()
        return VadConfig(aggressiveness=td.aggressiveness(), hangover_ms=td.silence_duration_ms,
                         pre_roll_ms=td.prefix_padding_ms)

    def _turn_end(self, settings: SessionSettings) -> TurnEndConfig:
        td = settings.turn_detection
        if td is None or not td.semantic:
            return TurnEndConfig()
        threshold, max_pause_ms = EAGERNESS[td.eagerness]
        return TurnEndConfig("smart", threshold, max_pause_ms)

    def _generation(self, settings: SessionSettings) -> GenerationOptions:
        from dataclasses import replace

        generation = self._base_generation
        if settings.temperature is not None:
            generation = replace(generation, temperature=settings.temperature)
        if settings.max_output_tokens is not None:
            generation = replace(generation, max_new_tokens=min(settings.max_output_tokens,
                                                                generation.max_new_tokens))
        return generation

    def _send(self, event: dict[str, Any]) -> None:
        """Under the lock: stamp the event's id and hand it to the transport in order."""
        self._send_raw({"event_id": event_id(), **event})


_HANDLERS: dict[str, Callable[[RealtimeSession, dict[str, Any]], None]] = {
    "session.update": RealtimeSession._session_update,
    "input_audio_buffer.append": RealtimeSession._append,
    "input_audio_buffer.commit": RealtimeSession._commit,
    "input_audio_buffer.clear": RealtimeSession._clear,
    "conversation.item.create": RealtimeSession._item_create,
    "conversation.item.delete": RealtimeSession._item_delete,
    "conversation.item.truncate": RealtimeSession._item_truncate,
    "response.create": RealtimeSession._response_create,
    "response.cancel": RealtimeSession._response_cancel,
}
