"""`glmvoice serve` under load: N official-SDK clients at once, each streaming a spoken conversation in real time.

Models (random weights, as in `benchmarks/latency.py`): the real-size speech tokenizer and decoder and the
scaled LM of `benchmarks/lm.py`, served by the Realtime API server (`glmvoice_cli.serve`) on a loopback port
in this process (uvicorn on its own thread and event loop, the model worker on its own thread). Each client is
`openai.AsyncOpenAI(...).realtime.connect()`, sends one of latency.py's espeak-ng conversations as 24 kHz PCM16
in 100 ms chunks at real-time pace with server VAD, and plays what comes back on a simulated speaker.

Per answer it records end of voice (the wall time the question's last voiced sample was sent) -> first
`response.output_audio.delta`, and underruns (a delta arriving after the simulated speaker ran dry inside an
answer). Side by side, the same conversations run on the conversation core in-process
(`benchmarks/conversations.py`'s worker: no socket, no protocol): the server's own overhead is the ratio.

    python benchmarks/realtime.py [--counts 1 2 4] [--max-new-tokens 30] [--out benchmarks/results/realtime-cpu.json]
    python benchmarks/realtime.py --quick    # tiny random models
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glmvoice_cli.audio.vad import VadConfig
from glmvoice_cli.lm.voice_lm import GenerationOptions
from glmvoice_cli.pipeline.assistant import Assistant
from glmvoice_cli.serve.protocol import encode_pcm16
from glmvoice_cli.threads import on_passing_thread

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conversations import run_worker
from conversations import summarize as summarize_local
from latency import ANSWER_ROOM_S, CONVERSATIONS, RATE, build, emit, envelope, espeak, script, stats

WIRE_RATE = 24_000
CHUNK_S = 0.1  # client chunks, as the SDK examples send them
VOICED = 1e-3  # |sample| above this counts as voice when finding where a question ends
TAIL_S = 300.0  # after the script: the longest wait for the last answers (as conversations.py's RUN_SLACK_S)


@dataclass
class Client:
    """One client's view of its conversation."""

    voice_ends: list[float] = field(default_factory=list)  # wall time each question's last voiced sample was sent
    created: list[float] = field(default_factory=list)  # wall time of each response.created
    first_audio: dict[str, float] = field(default_factory=dict)  # response id -> first audio delta wall time
    order: list[str] = field(default_factory=list)  # response ids in creation order
    underruns: int = 0
    statuses: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def voice_end_offsets(turns: list[np.ndarray]) -> list[float]:
    """Seconds into `latency.script(turns)` where each question's voice ends."""
    ends, at = [], 0.5  # script() starts with 0.5 s of silence
    for turn in turns:
        voiced = np.flatnonzero(np.abs(turn) > VOICED)
        ends.append(at + (voiced[-1] + 1 if len(voiced) else len(turn)) / RATE)
        at += len(turn) / RATE + ANSWER_ROOM_S
    return ends


def to_wire(samples_16k: np.ndarray) -> np.ndarray:
    import soxr

    return np.asarray(soxr.resample(samples_16k, RATE, WIRE_RATE), dtype=np.float32)


async def one_client(url: str, wire: np.ndarray, ends_s: list[float]) -> Client:
    from openai import AsyncOpenAI

    seen = Client()
    step = int(CHUNK_S * WIRE_RATE)
    async with AsyncOpenAI(api_key="bench", websocket_base_url=url.removesuffix("/realtime")).realtime.connect(
            model="glm-4-voice-9b") as conn:
        # the chat's turn-taking (the in-process side's VadConfig), not the API's shorter default silence
        vad = VadConfig()
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": {
            "type": "server_vad", "silence_duration_ms": vad.hangover_ms, "prefix_padding_ms": vad.pre_roll_ms}}}})
        speaker = {"ends_at": 0.0, "response": None}

        async def read() -> None:
            async for event in conn:
                now = time.perf_counter()
                if event.type == "response.created":
                    seen.created.append(now)
                    seen.order.append(event.response.id)
                elif event.type == "response.output_audio.delta":
                    seconds = len(base64.b64decode(event.delta)) / 2 / WIRE_RATE
                    if event.response_id not in seen.first_audio:
                        seen.first_audio[event.response_id] = now
                        speaker.update(ends_at=now, response=event.response_id)
                    elif now > speaker["ends_at"]:
                        seen.underruns += 1  # the speaker ran dry inside this answer
                    speaker["ends_at"] = max(speaker["ends_at"], now) + seconds
                elif event.type == "response.done":
                    seen.statuses.append(event.response.status)
                elif event.type == "error":
                    seen.errors.append(event.error.message)

        reader = asyncio.create_task(read())
        start = time.perf_counter()
        pending_ends = list(ends_s)
        for k, at in enumerate(range(0, len(wire), step)):
            await conn.input_audio_buffer.append(audio=encode_pcm16(wire[at : at + step]))
            sent_to = (at + step) / WIRE_RATE
            while pending_ends and pending_ends[0] <= sent_to:
                seen.voice_ends.append(time.perf_counter())
                pending_ends.pop(0)
            delay = start + (k + 1) * CHUNK_S - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        deadline = time.perf_counter() + TAIL_S
        # every question answered (or its answer cut by the next one) and every answer done, or give up
        while (len(seen.created) < len(ends_s) or len(seen.statuses) < len(seen.created)) \
                and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
        reader.cancel()
    return seen


def latencies(seen: Client) -> list[float]:
    """Per question: end of voice -> first audio delta of the first response created after it."""
    out = []
    for end in seen.voice_ends:
        after = [rid for rid, created in zip(seen.order, seen.created, strict=True) if created >= end]
        if after and after[0] in seen.first_audio:
            out.append(round(seen.first_audio[after[0]] - end, 4))
    return out


class InProcessServer:
    """`glmvoice serve`'s app on a loopback port, in a thread of this process."""

    def __init__(self, assistant: Assistant, max_new_tokens: int, seed: int, sessions: int) -> None:
        import uvicorn

        from glmvoice_cli.serve.app import RealtimeServer, ServeOptions

        self.server = RealtimeServer(assistant, GenerationOptions(max_new_tokens=max_new_tokens, seed=seed),
                                     ServeOptions(max_sessions=sessions, save=False))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.sock.getsockname()[1]}/v1/realtime"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.server.app(), log_level="warning",
                                                     ws_per_message_deflate=False))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.uvicorn.serve(sockets=[self.sock])),
                                       daemon=True)

    def __enter__(self) -> None:
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(60)
        self.sock.close()


def run_clients(assistant: Assistant, turns: list[list[np.ndarray]], max_new_tokens: int, seed: int) -> dict:
    """len(turns) clients at once, each one scripted conversation; their latencies and underruns."""
    scripts = [to_wire(script(t)) for t in turns]
    ends = [voice_end_offsets(t) for t in turns]
    served = InProcessServer(assistant, max_new_tokens, seed, len(turns))
    with served:
        async def all_clients() -> list[Client]:
            return list(await asyncio.gather(*(one_client(served.url, s, e) for s, e in zip(scripts, ends, strict=True))))

        start = time.perf_counter()
        clients = asyncio.run(all_clients())
        wall = time.perf_counter() - start
    values = [v for c in clients for v in latencies(c)]
    return {"end_of_voice_to_first_audio_delta_s": stats(values),
            "underruns": sum(c.underruns for c in clients),
            "answers": sum(len(c.statuses) for c in clients),
            "statuses": sorted({s for c in clients for s in c.statuses}),
            "errors": [e for c in clients for e in c.errors],
            "per_client_s": [latencies(c) for c in clients], "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny random models")
    ap.add_argument("--speech-dir", type=Path, default=None, help="as in latency.py (espeak-ng renders the rest)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        assistant = on_passing_thread(lambda: build(Path(scratch), args.seed, args.quick))
        spoken = [[espeak(t, Path(scratch), args.speech_dir) for t in turns] for turns in CONVERSATIONS.values()]
        load_before = os.getloadavg()[0]
        run_clients(assistant, [[spoken[0][0][: RATE * 3]]], 8, args.seed)  # warm-up: first calls allocate
        results = {}
        for n in args.counts:
            picked = [spoken[k % len(spoken)] for k in range(n)]
            served = run_clients(assistant, picked, args.max_new_tokens, args.seed)
            local = summarize_local(run_worker(assistant, [script(t) for t in picked], args.max_new_tokens,
                                               args.seed))
            local.pop("conversations")
            s, m = served["end_of_voice_to_first_audio_delta_s"]["median"], \
                local["end_of_voice_to_first_sample_s"]["median"]
            results[str(n)] = {"server": served, "in_process": local,
                               "server_over_in_process_median": round(s / m, 3) if s and m else None}
    result = {
        "benchmark": "realtime",
        "models": "tiny random set (--quick)" if args.quick else
                  "random weights: real-size tokenizer and decoder, scaled LM of benchmarks/lm.py",
        "input": "latency.py's espeak-ng conversations, 24 kHz PCM16 in 100 ms chunks at real-time pace, server VAD",
        "client": "openai AsyncOpenAI().realtime.connect(), one per conversation, started together",
        "max_new_tokens": args.max_new_tokens,
        "results": results,
        **envelope(load_before),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()

