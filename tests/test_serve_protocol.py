"""The Realtime API's wire format and the client-playback clock, alone (no server, no models)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from glmvoice_cli.serve.protocol import (
    ProtocolError,
    SessionSettings,
    apply_session_update,
    decode_pcm16,
    encode_pcm16,
    error_event,
    user_text,
)
from glmvoice_cli.serve.wire_audio import ClientPlayback, WireInput, WireOutput


def test_pcm16_round_trip_and_clipping() -> None:
    samples = np.array([0.0, 0.5, -0.5, 0.999, -1.0, 3.0, -3.0], dtype=np.float32)
    back = decode_pcm16(encode_pcm16(samples))
    np.testing.assert_allclose(back[:5], samples[:5], atol=1 / 32768)
    assert back[5] == pytest.approx(32767 / 32768) and back[6] == -1.0  # clipped, never wrapped


@pytest.mark.parametrize("bad", ["***", 12, None, base64.b64encode(b"abc").decode()])
def test_audio_that_is_not_pcm16_is_refused(bad: object) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_pcm16(bad)
    assert caught.value.param == "audio"


def test_session_update_applies_what_glmvoice_honours() -> None:
    settings = apply_session_update(SessionSettings(), {
        "type": "realtime", "output_modalities": ["text"], "max_output_tokens": 100,
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": 300, "threshold": 0.9,
                                               "prefix_padding_ms": 100}},
                  "output": {"voice": None}}})
    assert settings.output_modalities == ["text"] and settings.max_output_tokens == 100
    vad = settings.turn_detection
    assert vad is not None and vad.silence_duration_ms == 300 and vad.prefix_padding_ms == 100
    assert vad.aggressiveness() == 3
    push_to_talk = apply_session_update(settings, {"audio": {"input": {"turn_detection": None}}})
    assert push_to_talk.turn_detection is None and settings.turn_detection is vad  # the old one untouched


@pytest.mark.parametrize(("session", "param"), [
    ({"instructions": "talk like a pirate"}, "session.instructions"),
    ({"audio": {"output": {"voice": "alloy"}}}, "session.audio.output.voice"),
    ({"audio": {"input": {"format": {"type": "audio/pcmu"}}}}, "session.audio.input.format"),
    ({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}, "session.audio.input.format"),
    ({"audio": {"input": {"turn_detection": {"type": "llm_vad"}}}}, "session.audio.input.turn_detection.type"),
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "silence_duration_ms": 300}}}},
     "session.audio.input.turn_detection.silence_duration_ms"),
    ({"audio": {"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "frantic"}}}},
     "session.audio.input.turn_detection.eagerness"),
    ({"audio": {"input": {"turn_detection": {"type": "server_vad", "create_response": False}}}},
     "session.audio.input.turn_detection.create_response"),
    ({"temperature": 9}, "session.temperature"),
    ({"bogus": 1}, "session.bogus"),
    ({"output_modalities": ["audio", "text"]}, "session.output_modalities"),
])
def test_session_fields_glmvoice_cannot_honour_are_refused_by_name(session: dict, param: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        apply_session_update(SessionSettings(), session)
    assert caught.value.param == param
    event = error_event(caught.value, "evt_1")
    assert event["type"] == "error" and event["error"]["event_id"] == "evt_1" and event["error"]["param"] == param


def test_semantic_vad_is_parsed_and_echoed() -> None:
    settings = apply_session_update(SessionSettings(), {"audio": {"input": {"turn_detection": {
        "type": "semantic_vad", "eagerness": "low", "interrupt_response": False}}}})
    vad = settings.turn_detection
    assert vad is not None and vad.semantic and vad.eagerness == "low" and not vad.interrupt_response
    assert vad.as_json() == {"type": "semantic_vad", "eagerness": "low", "create_response": True,
                             "interrupt_response": False}
    assert apply_session_update(settings, {"audio": {"input": {"turn_detection": {"type": "server_vad"}}}}
                                ).turn_detection.as_json()["type"] == "server_vad"  # type: ignore[union-attr]


def test_typed_items() -> None:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": " hi "},
                                                           {"type": "input_text", "text": "there"}]}
    assert user_text(item) == "hi \nthere"
    for bad in ({**item, "role": "assistant"}, {**item, "content": []},
                {**item, "content": [{"type": "input_audio", "audio": "AAAA"}]},
                {**item, "content": [{"type": "input_text", "text": "x" * 30_000}]}):
        with pytest.raises(ProtocolError):
            user_text(bad)


def test_client_playback_follows_the_clock_and_a_flush_drops_the_unplayed_rest() -> None:
    now = [10.0]
    playback = ClientPlayback(sample_rate=1000, now=lambda: now[0])
    playback.write(np.zeros(500))
    playback.write(np.zeros(500))  # one second queued at 10.0
    assert (playback.played, playback.pending) == (0, 1000)
    now[0] = 10.25
    assert (playback.played, playback.pending) == (250, 750)
    assert playback.flush() == 750
    assert (playback.played, playback.pending) == (250, 0)
    now[0] = 20.0  # a gap: the next answer starts playing when it arrives, not in the past
    playback.write(np.zeros(100))
    assert playback.pending == 100
    now[0] = 20.05
    assert (playback.played, playback.pending) == (300, 50)


def test_wire_resampling_keeps_length_and_tone() -> None:
    seconds = 1.0
    tone = np.sin(2 * np.pi * 440 * np.arange(int(24_000 * seconds)) / 24_000).astype(np.float32)
    to_model = WireInput()
    out = np.concatenate([*(to_model(block) for block in np.array_split(tone, 17)), to_model.finish()])
    assert abs(len(out) - 16_000 * seconds) <= 2
    answer = np.sin(2 * np.pi * 440 * np.arange(22_050) / 22_050).astype(np.float32)
    to_wire = WireOutput()
    wire = np.concatenate([*(to_wire(block) for block in np.array_split(answer, 9)), to_wire.finish()])
    assert abs(len(wire) - 24_000) <= 2
    spectrum = np.abs(np.fft.rfft(wire))
    assert abs(np.argmax(spectrum) * 24_000 / len(wire) - 440) < 2


def test_the_outbox_counts_unsent_bytes_and_flags_a_client_that_reads_nothing() -> None:
    import asyncio

    from glmvoice_cli.serve.app import Outbox
    from glmvoice_cli.serve.session import CLOSE

    async def scenario() -> tuple[list[str | None], int, bool, bool]:
        outbox = Outbox(asyncio.get_running_loop(), limit=100)
        outbox.put({"type": "a", "delta": "x" * 40})
        await asyncio.sleep(0)
        under = outbox.overflowed.is_set()
        outbox.put({"type": "b", "delta": "y" * 80})  # now over 100 bytes not yet sent
        outbox.put(CLOSE)
        await asyncio.sleep(0)
        got = [await outbox.get() for _ in range(3)]
        for text in got:
            outbox.sent(text)
        return got, outbox.pending, under, outbox.overflowed.is_set()

    got, pending, under, over = asyncio.run(scenario())
    assert [None if t is None else json.loads(t)["type"] for t in got] == ["a", "b", None]  # in order, serialised
    assert not under and over and pending == 0
