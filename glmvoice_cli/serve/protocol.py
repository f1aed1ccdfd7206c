"""The OpenAI Realtime API's wire format, as far as glmvoice speaks it: ids, errors, audio, session settings.

Nothing here knows about sockets or models: these are pure functions over the JSON shapes (GA protocol,
as the official `openai` SDK sends and parses them), so each is tested alone.

Audio on the wire is base64 PCM16 little-endian mono at 24 kHz in both directions (`audio/pcm`).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WIRE_RATE = 24_000  # Hz, the protocol's PCM16 rate both ways
PCM_BYTES = 2  # bytes per PCM16 sample
PCM_SCALE = 32768.0
MAX_TEXT_CHARS = 20_000  # a typed user message longer than this is refused (the LM's context is far smaller)

_EVENT_COUNTER = itertools.count(1)


def new_id(prefix: str) -> str:
    """An id in the API's style (`event_…`, `item_…`, `resp_…`, `sess_…`): unique within the process."""
    return f"{prefix}_{secrets.token_hex(8)}"


def event_id() -> str:
    return f"event_{next(_EVENT_COUNTER):08d}{secrets.token_hex(3)}"


class ProtocolError(Exception):
    """A client event the server refuses; becomes an `error` event (the connection goes on)."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.kind = message, code, param, kind


def error_event(error: ProtocolError, client_event_id: str | None = None) -> dict[str, Any]:
    return {"type": "error", "event_id": event_id(),
            "error": {"type": error.kind, "code": error.code, "message": error.message, "param": error.param,
                      "event_id": client_event_id}}


# ---------------------------------------------------------------------- audio


def decode_pcm16(data: Any, param: str = "audio") -> np.ndarray:
    """base64 PCM16 -> (n,) float32 in [-1, 1); ProtocolError for anything else."""
    if not isinstance(data, str):
        raise ProtocolError(f"'{param}' must be a base64 string of PCM16 audio", param=param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"'{param}' is not valid base64", code="invalid_audio", param=param) from None
    if len(raw) % PCM_BYTES:
        raise ProtocolError(f"'{param}' is {len(raw)} bytes: PCM16 audio has an even number of bytes",
                            code="invalid_audio", param=param)
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / PCM_SCALE


def encode_pcm16(samples: np.ndarray) -> str:
    """(n,) float samples -> base64 PCM16 (clipped to full scale)."""
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * PCM_SCALE), -32768, 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")


def ms_of(samples: int, rate: int) -> int:
    return int(samples * 1000 // rate)


# ---------------------------------------------------------------------- session settings


# semantic_vad's eagerness -> (the smart detector's threshold, the longest pause of a turn it judged unfinished):
# low waits for more certainty and longer, high ends turns sooner (as OpenAI describes the setting)
EAGERNESS = {"low": (0.8, 3000), "medium": (0.5, 1500), "auto": (0.5, 1500), "high": (0.3, 800)}


@dataclass
class ServerVad:
    """`turn_detection: {type: server_vad}` as glmvoice runs it (webrtcvad, see `audio.vad`), or
    `{type: semantic_vad}`: the same VAD, with the smart end-of-turn detector at each pause
    (`audio.end_of_turn`; needs its model on the server)."""

    threshold: float = 0.5  # 0..1, mapped onto webrtcvad's aggressiveness 0..3
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    type: str = "server_vad"
    eagerness: str = "auto"  # semantic_vad: see EAGERNESS

    def aggressiveness(self) -> int:
        return min(3, int(self.threshold * 4))

    @property
    def semantic(self) -> bool:
        return self.type == "semantic_vad"

    def as_json(self) -> dict[str, Any]:
        if self.semantic:
            return {"type": "semantic_vad", "eagerness": self.eagerness, "create_response": self.create_response,
                    "interrupt_response": self.interrupt_response}
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": self.interrupt_response, "idle_timeout_ms": None}


@dataclass
class SessionSettings:
    """What a client may set with `session.update` (everything else is refused with an `error`)."""

    model: str = "glm-4-voice-9b"
    turn_detection: ServerVad | None = field(default_factory=ServerVad)  # None: push-to-talk
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    temperature: float | None = None
    max_output_tokens: int | None = None

    def as_json(self, session_id: str) -> dict[str, Any]:
        audio_format = {"type": "audio/pcm", "rate": WIRE_RATE}
        return {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": self.model,
            "output_modalities": list(self.output_modalities), "instructions": "", "tools": [],
            "tool_choice": "auto", "max_output_tokens": self.max_output_tokens or "inf",
            "audio": {
                "input": {"format": audio_format, "transcription": None, "noise_reduction": None,
                          "turn_detection": None if self.turn_detection is None else self.turn_detection.as_json()},
                "output": {"format": audio_format, "voice": "glm-4-voice", "speed": 1.0},
            },
        }


_UNSUPPORTED = {  # session field -> why glmvoice refuses it
    "instructions": "GLM-4-Voice's system prompt is fixed by the model card: instructions are not supported",
    "tools": "function calling (tools) is not supported",
    "tool_choice": "function calling (tools) is not supported",
    "prompt": "stored prompts are not supported",
    "tracing": "tracing is not supported",
    "truncation": "only the default conversation truncation is supported",
    "include": "'include' is not supported",
}
_IGNORED = {"type", "object", "id", "expires_at", "client_secret"}  # echoes of session.created: harmless


def apply_session_update(settings: SessionSettings, session: Any) -> SessionSettings:
    """The settings after `session.update`'s `session` object; ProtocolError (nothing changed) for a field
    glmvoice cannot honour, so a client is told instead of silently getting something else."""
    if not isinstance(session, dict):
        raise ProtocolError("'session' must be an object", param="session")
    new = SessionSettings(settings.model, settings.turn_detection, list(settings.output_modalities),
                          settings.temperature, settings.max_output_tokens)
    for key, value in session.items():
        param = f"session.{key}"
        if key in _IGNORED:
            continue
        if key in _UNSUPPORTED:
            if value in (None, "", [], "auto") and key != "prompt":
                continue  # the defaults, as some clients send them
            raise ProtocolError(_UNSUPPORTED[key], code="unsupported", param=param)
        if key == "model":
            new.model = _string(value, param)
        elif key == "output_modalities":
            new.output_modalities = _modalities(value, param)
        elif key == "temperature":
            new.temperature = _number(value, param, 0.0, 2.0)
        elif key == "max_output_tokens":
            new.max_output_tokens = None if value == "inf" else int(_number(value, param, 1, 1_000_000))
        elif key == "audio":
            _apply_audio(new, value)
        else:
            raise ProtocolError(f"unknown session field '{key}'", code="unknown_parameter", param=param)
    return new


def _apply_audio(new: SessionSettings, audio: Any) -> None:
    if not isinstance(audio, dict):
        raise ProtocolError("'session.audio' must be an object", param="session.audio")
    for side, value in audio.items():
        if side not in ("input", "output") or not isinstance(value, dict):
            raise ProtocolError(f"'session.audio.{side}' is not a known audio setting", param=f"session.audio.{side}")
        for key, item in value.items():
            param = f"session.audio.{side}.{key}"
            if key == "format":
                _check_format(item, param)
            elif side == "input" and key == "turn_detection":
                new.turn_detection = parse_turn_detection(item, param)
            elif side == "input" and key in ("transcription", "noise_reduction"):
                if item is not None:
                    what = "input transcription" if key == "transcription" else "server-side noise reduction"
                    raise ProtocolError(f"{what} is not supported (the model hears the audio itself)",
                                        code="unsupported", param=param)
            elif side == "output" and key == "voice":
                if item not in (None, "glm-4-voice"):
                    raise ProtocolError("GLM-4-Voice has one voice: 'voice' cannot be chosen", code="unsupported",
                                        param=param)
            elif side == "output" and key == "speed":
                if item not in (None, 1, 1.0):
                    raise ProtocolError("output speed cannot be changed", code="unsupported", param=param)
            else:
                raise ProtocolError(f"unknown audio setting '{key}'", code="unknown_parameter", param=param)


def _check_format(value: Any, param: str) -> None:
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else value
    rate = value.get("rate", WIRE_RATE) if isinstance(value, dict) else WIRE_RATE
    if kind not in ("audio/pcm", "pcm16") or rate != WIRE_RATE:
        raise ProtocolError(f"only audio/pcm at {WIRE_RATE} Hz is supported", code="unsupported", param=param)


def parse_turn_detection(value: Any, param: str = "turn_detection") -> ServerVad | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"'{param}' must be an object or null", param=param)
    kind = value.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise ProtocolError(f"turn detection '{kind}' is not supported: use server_vad, semantic_vad or null "
                            "(push-to-talk)", code="unsupported", param=f"{param}.type")
    vad = ServerVad(type=kind)
    own = {"eagerness"} if vad.semantic else {"threshold", "prefix_padding_ms", "silence_duration_ms"}
    for key, item in value.items():
        sub = f"{param}.{key}"
        if key == "type" or item is None:
            continue
        if key in {"eagerness", "threshold", "prefix_padding_ms", "silence_duration_ms"} - own:
            raise ProtocolError(f"'{key}' is not a setting of {kind}", code="unknown_parameter", param=sub)
        if key == "eagerness":
            if item not in EAGERNESS:
                raise ProtocolError(f"'{sub}' must be one of {', '.join(EAGERNESS)}", param=sub)
            vad.eagerness = item
        elif key == "threshold":
            vad.threshold = _number(item, sub, 0.0, 1.0)
        elif key == "prefix_padding_ms":
            vad.prefix_padding_ms = int(_number(item, sub, 0, 5000))
        elif key == "silence_duration_ms":
            vad.silence_duration_ms = int(_number(item, sub, 30, 10_000))
        elif key in ("create_response", "interrupt_response"):
            if not isinstance(item, bool):
                raise ProtocolError(f"'{sub}' must be true or false", param=sub)
            if key == "create_response" and not item:
                raise ProtocolError(f"with {kind} every turn is answered (create_response false is not "
                                    "supported: use turn_detection null and response.create)", code="unsupported",
                                    param=sub)
            setattr(vad, key, item)
        elif key == "idle_timeout_ms":
            raise ProtocolError("idle_timeout_ms is not supported", code="unsupported", param=sub)
        else:
            raise ProtocolError(f"unknown turn detection setting '{key}'", code="unknown_parameter", param=sub)
    return vad


def _modalities(value: Any, param: str) -> list[str]:
    if value not in (["audio"], ["text"]):
        raise ProtocolError("output_modalities must be [\"audio\"] or [\"text\"]", param=param)
    return list(value)


def _string(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise ProtocolError(f"'{param}' must be a short string", param=param)
    return value


def _number(value: Any, param: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ProtocolError(f"'{param}' must be a number from {low:g} to {high:g}", param=param)
    return float(value)


def user_text(item: Any) -> str:
    """The text of a `conversation.item.create` user message (input_text parts joined)."""
    if not isinstance(item, dict):
        raise ProtocolError("'item' must be an object", param="item")
    if item.get("type", "message") != "message":
        raise ProtocolError(f"items of type '{item.get('type')}' are not supported: only messages",
                            code="unsupported", param="item.type")
    if item.get("role") != "user":
        raise ProtocolError("only user messages can be added (the history of answers is the model's own)",
                            code="unsupported", param="item.role")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise ProtocolError("'item.content' must be a non-empty list", param="item.content")
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "input_text" or not isinstance(part.get("text"), str):
            raise ProtocolError("only input_text parts are supported in created items (send speech with "
                                "input_audio_buffer.append)", code="unsupported", param="item.content")
        parts.append(part["text"])
    text = "\n".join(parts).strip()
    if not text:
        raise ProtocolError("the message is empty", param="item.content")
    if len(text) > MAX_TEXT_CHARS:
        raise ProtocolError(f"the message is longer than {MAX_TEXT_CHARS} characters", param="item.content")
    return text
