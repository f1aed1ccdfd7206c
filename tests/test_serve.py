"""`glmvoice serve` end to end: a real server process on the tiny models, the official `openai` realtime client.

Each test opens its own connections to one server (module fixture); the sessions it saves are read back from
its session folder. Spoken input is espeak-ng speech (those tests skip without it).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from glmvoice_cli.audio.io import load_audio
from glmvoice_cli.tiny.modelset import TinyModelSet

from .realtime_helpers import (
    KEY,
    PUSH_TO_TALK,
    SAVE_ATTEMPTS,
    WIRE_RATE,
    Answer,
    Server,
    answer,
    client,
    next_event,
    saved_session,
    server_env,
    session_root,
    start_server,
    stream,
    transcript,
    typed,
    until,
    wire_audio,
)

pytest.importorskip("openai")
pytest.importorskip("starlette")

SILENCE_S = 1.5  # after the speech: longer than the server VAD's silence_duration_ms
TRUNCATE_MS = 500
HANG_S = 120.0  # a wait that only guards against a hang
SLOT_ATTEMPTS = 150  # connections tried, 0.2 s apart, before a vanished client's slot counts as never freed  # a whole number of samples at 22.05 kHz (the barge-in side counts in samples)


@pytest.fixture(scope="module")
def server(tiny_models: TinyModelSet, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("serve")
    running = start_server(tiny_models.root, folder, "--session-dir", str(folder / "sessions"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """A spoken question at the wire rate, then silence."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed")
    folder = Path(__import__("tempfile").mkdtemp())
    subprocess.run([exe, "-w", str(folder / "q.wav"), "What is the weather like today?"], check=True, timeout=60)
    samples = load_audio(folder / "q.wav", WIRE_RATE).samples
    return np.concatenate([np.zeros(WIRE_RATE // 2, np.float32), samples, np.zeros(int(SILENCE_S * WIRE_RATE),
                                                                                   np.float32)])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _check_answer(got: Answer) -> None:
    assert got.status in ("completed", "incomplete"), got.done
    assert got.audio and len(wire_audio(got.audio)) > 0
    assert got.transcript  # the answer's text tokens
    order = got.types
    assert order.index("response.output_item.added") < order.index("response.output_audio.delta")
    assert order[-4:] == ["response.content_part.done", "response.output_item.done", "conversation.item.done",
                          "response.done"]
    done = next(e for e in got.events if e.type == "response.output_audio_transcript.done")
    assert done.transcript == got.transcript.strip()


# ---------------------------------------------------------------------- turns


def test_a_spoken_turn_with_server_vad_is_answered_in_audio_and_text(server: Server, speech: np.ndarray) -> None:
    async def talk() -> tuple[list[Any], Answer]:
        async with client(server).realtime.connect(model="glm-4-voice-9b") as conn:
            created = await next_event(conn)
            assert created.type == "session.created" and created.session.id
            await stream(conn, speech)
            before = await until(conn, "response.created")
            return before, await answer(conn)

    before, got = run(talk())
    kinds = [e.type for e in before]
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "conversation.item.added"):
        assert kind in kinds
    started = next(e for e in before if e.type == "input_audio_buffer.speech_started")
    committed = next(e for e in before if e.type == "input_audio_buffer.committed")
    assert started.item_id == committed.item_id and 300 <= started.audio_start_ms <= 900  # the speech began at 0.5 s
    _check_answer(got)


def test_push_to_talk_commit_then_response_create(server: Server, speech: np.ndarray) -> None:
    async def talk() -> tuple[list[Any], Answer]:
        async with client(server).realtime.connect(model="glm-4-voice-9b") as conn:
            await until(conn, "session.created")
            await conn.session.update(session=PUSH_TO_TALK)
            updated = await until(conn, "session.updated")
            assert updated[-1].session.audio.input.turn_detection is None
            await stream(conn, speech)
            await conn.input_audio_buffer.commit()
            committed = await until(conn, "conversation.item.done")
            await conn.response.create()
            return committed, await answer(conn)

    committed, got = run(talk())
    assert [e.type for e in committed] == ["input_audio_buffer.committed", "conversation.item.added",
                                           "conversation.item.done"]
    assert not any(e.type == "input_audio_buffer.speech_started" for e in got.events)  # no server VAD
    _check_answer(got)
    saved = saved_session(server, 2)
    assert saved[0]["role"] == "user" and saved[0]["audio"] and saved[1]["role"] == "assistant"


def test_response_cancel_mid_answer_ends_it_cancelled(server: Server) -> None:
    async def talk() -> tuple[Answer, Answer]:
        async with client(server).realtime.connect(model="glm-4-voice-9b") as conn:
            await until(conn, "session.created")
            await conn.conversation.item.create(item=typed("Tell me a long story."))
            await conn.response.create()
            cancelled = await answer(conn, on_first_audio=lambda e: conn.response.cancel())
            await conn.conversation.item.create(item=typed("And then?"))  # the session goes on
            await conn.response.create()
            return cancelled, await answer(conn)

    cancelled, after = run(talk())
    assert cancelled.status == "cancelled"
    assert cancelled.done.response.status_details.reason == "client_cancelled"
    _check_answer(after)
    saved = saved_session(server, 4)
    assert saved[1]["interrupted"] is True


def test_truncate_trims_the_history_exactly_as_a_barge_in_there(server: Server, assistant: Any) -> None:
    texts = ["Hello, who are you?", "What did you just say?"]

    async def talk() -> None:
        async with client(server).realtime.connect(model="glm-4-voice-9b") as conn:
            await until(conn, "session.created")
            await conn.conversation.item.create(item=typed(texts[0]))
            await conn.response.create()
            first = await answer(conn)
            assert len(wire_audio(first.audio)) > TRUNCATE_MS * WIRE_RATE // 1000
            await conn.conversation.item.truncate(item_id=first.item_id, content_index=0, audio_end_ms=TRUNCATE_MS)
            truncated = await until(conn, "conversation.item.truncated")
            assert truncated[-1].audio_end_ms == TRUNCATE_MS
            await conn.conversation.item.create(item=typed(texts[1]))
            await conn.response.create()
            await answer(conn)

    run(talk())
    lines = saved_session(server, 4)
    assert [line["token_ids"] for line in lines] == _barge_in_in_process(assistant, texts, TRUNCATE_MS)
    assert lines[1]["interrupted"] and lines[1]["duration_s"] == TRUNCATE_MS / 1000  # its audio trimmed too


def _barge_in_in_process(assistant: Any, texts: list[str], heard_ms: int) -> list[list[int]]:
    """The same two typed turns on a conversation core whose listener cuts in after `heard_ms` of the first
    answer (a barge-in: the core's own played count, on a frozen clock)."""
    from glmvoice_cli.chat.core import ConversationCore, EngineConfig
    from glmvoice_cli.chat.worker import ModelWorker
    from glmvoice_cli.events import AssistantTurn, TurnEnded, UserUtterance
    from glmvoice_cli.lm.voice_lm import GenerationOptions
    from glmvoice_cli.serve.wire_audio import ClientPlayback

    torch.set_num_threads(1)
    now = [0.0]
    playback = ClientPlayback(now=lambda: now[0])
    worker = ModelWorker(prepare=assistant.prepare_thread)
    core = ConversationCore(assistant, playback, worker, hears_audio=False,
                            config=EngineConfig(generation=GenerationOptions(max_new_tokens=40, seed=1)))
    events = core.subscribe()
    core.start()
    worker.start()
    ids: list[list[int]] = []
    try:
        _generated(core, texts[0])
        now[0] = heard_ms / 1000
        core.interrupt()
        _collect(events, ids, UserUtterance, AssistantTurn, TurnEnded)
        _generated(core, texts[1])
        now[0] = 1e6  # played out
        _collect(events, ids, UserUtterance, AssistantTurn, TurnEnded)
    finally:
        core.stop()
        worker.stop()
        worker.join()
    return ids


def _generated(core: Any, text: str) -> None:
    """Type a turn and wait until its answer is fully generated (it then waits to be played, on the frozen
    clock); the wait guards against a hang, it measures nothing."""
    core.type_text(text)
    job = core._open[-1]  # registered by type_text, before it returns
    assert job.generated.wait(HANG_S), "the answer was never generated"


def _collect(events: Any, ids: list[list[int]], user: type, turn: type, ended: type) -> None:
    while True:
        event = events.get(timeout=120)
        if (isinstance(event, user) and event.turn is not None) or isinstance(event, turn):
            ids.append(list(event.token_ids))
        elif isinstance(event, ended):
            return


@pytest.mark.parametrize("clients", [2, 4])
def test_clients_at_once_each_get_the_answer_they_get_alone(server: Server, clients: int) -> None:
    texts = ["Good morning!", "What time is it?", "Sing me a song.", "How far is the moon?"][:clients]

    async def one(text: str) -> Answer:
        async with client(server).realtime.connect(model="glm-4-voice-9b") as conn:
            await until(conn, "session.created")
            await conn.conversation.item.create(item=typed(text))
            await conn.response.create()
            return await answer(conn)

    async def together() -> list[Answer]:
        return list(await asyncio.gather(*(one(text) for text in texts)))

    at_once = run(together())
    alone = [run(one(text)) for text in texts]
    for got, want in zip(at_once, alone, strict=True):
        assert got.transcript == want.transcript
        np.testing.assert_array_equal(wire_audio(got.audio), wire_audio(want.audio))
    assert len({a.transcript for a in at_once} | {len(a.audio) for a in at_once}) > 1  # not one answer for all
    # and the histories the sessions saved: the same ids at once as alone
    for _ in range(SAVE_ATTEMPTS):  # the writers save behind the answers
        saved = _saved_by_first_text(server, texts)
        if all(len(saved.get(text, [])) >= 2 for text in texts):
            break
        time.sleep(0.1)
    for text in texts:
        histories = saved[text]
        assert len(histories) >= 2 and all(h == histories[0] for h in histories), text


def _saved_by_first_text(server: Server, texts: list[str]) -> dict[str, list[list[list[int]]]]:
    """Every saved session that began with one of `texts`, as its turns' token ids, grouped by that text."""
    root = session_root(server)
    grouped: dict[str, list[list[list[int]]]] = {}
    for folder in root.iterdir():
        lines = transcript(folder)
        if len(lines) >= 2 and lines[0]["text"] in texts:
            grouped.setdefault(lines[0]["text"], []).append([line["token_ids"] for line in lines])
    return grouped


# ---------------------------------------------------------------------- bad input


def test_each_bad_input_gets_an_error_event_and_the_session_goes_on(server: Server) -> None:
    import websockets

    bad: list[tuple[str, str]] = [
        ("{not json", "invalid_json"),
        ("[" * 100_000 + "]" * 100_000, "invalid_json"),  # nested past the parser: malformed like any other
        (json.dumps([1, 2]), "invalid_event"),
        (json.dumps({"type": "no.such.event"}), "unsupported_event"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@not base64"}), "invalid_audio"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "AAAB"}), "invalid_audio"),  # 3 bytes
        (json.dumps({"type": "session.update", "session": {"instructions": "be a pirate"}}), "unsupported"),
        (json.dumps({"type": "session.update", "session": {"audio": {"output": {"voice": "alloy"}}}}),
         "unsupported"),
        (json.dumps({"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}}),
         "unsupported"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"model": "whisper-1"}}}}}), "unsupported"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": -5}}}}}), "invalid_value"),
        (json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "turn_detection": {"type": "semantic_vad", "eagerness": "frantic"}}}}}), "invalid_value"),
        (json.dumps({"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0,
                     "audio_end_ms": 10}), "item_not_found"),
        (json.dumps({"type": "conversation.item.delete", "item_id": "item_nope"}), "unsupported"),
        (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
        (json.dumps({"type": "response.create"}), "no_user_input"),
        (json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "assistant",
                                                                  "content": []}}), "unsupported"),
        ("x" * (5 * 1024 * 1024), "message_too_large"),
    ]

    async def talk() -> list[tuple[str, Any]]:
        codes = []
        async with websockets.connect(server.url, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            for message, _ in bad:
                await ws.send(message)
                reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
                codes.append((reply["type"], reply.get("error", {}).get("code")))
            # push-to-talk: an empty commit, then more audio than the buffer holds
            await ws.send(json.dumps({"type": "session.update", "session": PUSH_TO_TALK}))
            assert json.loads(await ws.recv())["type"] == "session.updated"
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "mine"}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
            codes.append((reply["type"], reply["error"]["code"]))
            assert reply["error"]["event_id"] == "mine"  # the offending event is named
            chunk = json.dumps({"type": "input_audio_buffer.append",
                                "audio": __import__("base64").b64encode(bytes(WIRE_RATE * 2 * 30)).decode()})
            full = None
            for _ in range(6):  # 180 s of silence, 30 s at a time (faster than real time is fine)
                await ws.send(chunk)
                try:
                    full = json.loads(await asyncio.wait_for(ws.recv(), 1.0))
                    break
                except asyncio.TimeoutError:
                    continue
            assert full is not None and full["error"]["code"] == "input_audio_buffer_full"
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            assert json.loads(await ws.recv())["type"] == "input_audio_buffer.cleared"
            # and after all that, a turn is still answered
            await ws.send(json.dumps({"type": "conversation.item.create", "item": typed("Still there?")}))
            await ws.send(json.dumps({"type": "response.create"}))
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 120))
                if event["type"] == "response.done":
                    codes.append(("response.done", event["response"]["status"]))
                    return codes

    codes = run(talk())
    for (got_type, got_code), (_, want_code) in zip(codes[: len(bad)], bad, strict=True):
        assert (got_type, got_code) == ("error", want_code)
    assert codes[len(bad)] == ("error", "input_audio_buffer_commit_empty")
    assert codes[-1][0] == "response.done" and codes[-1][1] in ("completed", "incomplete")


def test_deleting_an_unanswered_item_leaves_it_out_of_the_answer(server: Server) -> None:
    async def talk() -> tuple[list[str], Answer]:
        async with client(server).realtime.connect(model="glm-4-voice-9b") as conn:
            await until(conn, "session.created")
            await conn.conversation.item.create(item=typed("Forget this."))
            added = await until(conn, "conversation.item.done")
            await conn.conversation.item.delete(item_id=added[-1].item.id)
            deleted = await until(conn, "conversation.item.deleted")
            await conn.conversation.item.create(item=typed("Remember this."))
            await conn.response.create()
            return [e.type for e in deleted], await answer(conn)

    _, got = run(talk())
    _check_answer(got)
    saved = saved_session(server, 2)
    assert saved[0]["text"] == "Remember this."


# ---------------------------------------------------------------------- admission, limits, shutdown


def test_api_key_session_limit_and_a_vanished_client_freeing_its_slot(tiny_models: TinyModelSet,
                                                                       tmp_path: Path) -> None:
    import openai
    import websockets

    guarded = start_server(tiny_models.root, tmp_path, "--api-key", KEY, "--max-sessions", "1", "--no-save")

    async def admission() -> None:
        with pytest.raises((openai.OpenAIError, websockets.exceptions.InvalidStatus, OSError)):
            async with client(guarded, key="wrong").realtime.connect(model="m") as conn:
                await next_event(conn)
        # the browser way: the key as a subprotocol, and `realtime` accepted back
        async with websockets.connect(guarded.url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]
                                      ) as first:
            assert first.subprotocol == "realtime"
            assert json.loads(await first.recv())["type"] == "session.created"
            async with client(guarded).realtime.connect(model="m") as second:  # over the limit
                refused = await next_event(second)
                assert refused.type == "error" and refused.error.code == "session_limit_reached"
            await first.send(json.dumps({"type": "conversation.item.create", "item": typed("Hi")}))
            await first.send(json.dumps({"type": "response.create"}))
            while json.loads(await first.recv())["type"] != "response.output_audio.delta":
                pass
            first.transport.abort()  # vanishes mid-answer, no close handshake
        for _ in range(SLOT_ATTEMPTS):  # its slot is free again (freed as the server notices the lost socket)
            async with client(guarded).realtime.connect(model="m") as third:
                if (await next_event(third)).type == "session.created":
                    return
            await asyncio.sleep(0.2)
        pytest.fail("the vanished client's slot was never freed")

    try:
        run(admission())
    finally:
        assert guarded.stop() == 0, guarded.stderr()


def test_sigterm_closes_every_connection_and_saves_the_sessions(tiny_models: TinyModelSet, tmp_path: Path) -> None:
    running = start_server(tiny_models.root, tmp_path, "--session-dir", str(tmp_path / "sessions"))
    closed = threading.Event()

    async def connected() -> None:
        async with client(running).realtime.connect(model="m") as conn:
            await until(conn, "session.created")
            await conn.conversation.item.create(item=typed("Hello"))
            await conn.response.create()
            await until(conn, "response.output_audio.delta")
            running.process.send_signal(signal.SIGTERM)
            try:
                while True:
                    await next_event(conn, timeout=60)
            except Exception:  # noqa: BLE001 - the server closed the socket: that is the point
                closed.set()

    run(connected())
    assert closed.is_set()
    assert running.stop() == 0
    assert "stopped" in running.stderr() and "Traceback" not in running.stderr()
    folders = list((tmp_path / "sessions").iterdir())
    assert len(folders) == 1 and transcript(folders[0])[0]["text"] == "Hello"


def test_the_default_session_folder_is_the_one_glmvoice_sessions_lists(tiny_models: TinyModelSet,
                                                                       tmp_path: Path) -> None:
    running = start_server(tiny_models.root, tmp_path)

    async def talk() -> None:
        async with client(running).realtime.connect(model="m") as conn:
            await until(conn, "session.created")
            await conn.conversation.item.create(item=typed("Hello"))
            await conn.response.create()
            await answer(conn)

    try:
        run(talk())
    finally:
        assert running.stop() == 0
    listed = subprocess.run([sys.executable, "-m", "glmvoice_cli", "sessions", "list", "--json"],
                            check=False, capture_output=True, text=True, env=server_env(running.home),
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 1


def test_another_host_without_a_key_is_refused_in_one_line(tiny_models: TinyModelSet, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "glmvoice_cli", "serve", "--models", str(tiny_models.root),
                           "--host", "0.0.0.0"], check=False, capture_output=True, text=True, env=server_env(tmp_path),
                          timeout=120)
    assert done.returncode != 0
    assert "--api-key" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_client_that_reads_nothing_is_dropped_without_holding_up_the_others(tiny_models: TinyModelSet,
                                                                             tmp_path: Path) -> None:
    """It asks for long answers and never reads (its socket fills, pings go unanswered): the server drops it and
    frees its slot, while another client is answered meanwhile, and its log holds no traceback."""
    import urllib.request

    import websockets

    running = start_server(tiny_models.root, tmp_path, "--no-save", "--client-buffer-mb", "1",
                           "--max-new-tokens", "1200")
    health = running.base.replace("ws://", "http://").removesuffix("/v1") + "/health"

    def sessions() -> int:
        return int(json.loads(urllib.request.urlopen(health, timeout=10).read())["sessions"])

    async def scenario() -> tuple[bool, str]:
        async with websockets.connect(running.url, max_queue=1, max_size=None, ping_interval=None) as silent:
            await silent.send(json.dumps({"type": "conversation.item.create", "item": typed("Tell me a story")}))
            await silent.send(json.dumps({"type": "response.create"}))
            async with client(running).realtime.connect(model="m") as other:
                assert (await next_event(other)).type == "session.created"
                await other.conversation.item.create(item=typed("Hello?"))
                await other.response.create()
                status = ""
                while not status:
                    event = await asyncio.wait_for(next_event(other), HANG_S)
                    if event.type == "response.done":
                        status = event.response.status
            for _ in range(int(3 * HANG_S)):  # dropped within the ping timeout (40 s), or sooner by the buffer
                if await asyncio.to_thread(sessions) == 0:
                    return True, status
                await asyncio.sleep(1.0)
            return False, status

    try:
        dropped, status = run(scenario())
    finally:
        assert running.stop() == 0, running.stderr()
    assert status in ("completed", "incomplete")
    assert dropped, "the client that reads nothing was never dropped"
    assert "Traceback" not in running.stderr()


def test_semantic_vad_maps_eagerness_onto_the_smart_detector(server: Server, speech: np.ndarray) -> None:
    """The server found the Smart Turn model (the pipecat-ai wheel): semantic_vad is accepted, echoed, and a
    spoken turn under it is answered."""
    async def talk() -> tuple[Any, list[Any], Answer]:
        async with client(server).realtime.connect(model="glm-4-voice-9b") as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
                "type": "semantic_vad", "eagerness": "high"}}}})
            updated = (await until(conn, "session.updated"))[-1]
            await stream(conn, speech)
            before = await until(conn, "response.created")
            return updated, before, await answer(conn)

    updated, before, got = run(talk())
    detection = updated.session.audio.input.turn_detection
    assert detection.type == "semantic_vad" and detection.eagerness == "high"
    assert "input_audio_buffer.speech_stopped" in [e.type for e in before]
    _check_answer(got)


def test_semantic_vad_without_the_model_is_refused_and_eagerness_sets_the_policy(tiny_models: TinyModelSet) -> None:
    from glmvoice_cli.audio.end_of_turn import JudgeThread
    from glmvoice_cli.chat.worker import ModelWorker
    from glmvoice_cli.lm.voice_lm import GenerationOptions
    from glmvoice_cli.options import LoadOptions
    from glmvoice_cli.pipeline.assistant import Assistant
    from glmvoice_cli.serve.protocol import EAGERNESS
    from glmvoice_cli.serve.session import RealtimeSession

    assistant = Assistant.load(tiny_models.dirs, LoadOptions(device="cpu", seed=0))
    update = json.dumps({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "semantic_vad", "eagerness": "low"}}}}})
    for judge in (None, JudgeThread(lambda samples: 0.5)):
        sent: list[dict] = []
        session = RealtimeSession(assistant, ModelWorker(), sent.append, generation=GenerationOptions(),
                                  turn_judge=judge)
        session.handle(update)
        if judge is None:
            assert sent[-1]["type"] == "error" and "Smart Turn model" in sent[-1]["error"]["message"]
            assert session.core.config.turn_end.detector == "silence"
        else:
            assert sent[-1]["type"] == "session.updated"
            session.core._apply_settings()  # no turn under way: applied
            turn_end = session.core.config.turn_end
            assert (turn_end.detector, turn_end.threshold, turn_end.max_pause_ms) == ("smart", *EAGERNESS["low"])
