"""A real `glmvoice serve` process on the tiny models, and the official `openai` realtime client talking to it."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

START_TIMEOUT_S = 180.0
SAVE_ATTEMPTS = 300  # 0.1 s apart: a session writer saves behind the answer
EVENT_TIMEOUT_S = 120.0
WIRE_RATE = 24_000
KEY = "test-key"
_URL = re.compile(r"ws://[\w.\[\]:]+/v1/realtime")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str  # ws://host:port/v1/realtime
    home: Path  # GLMVOICE_HOME of the process (its default session folder lives here)
    log: Path

    @property
    def base(self) -> str:
        return self.url.removesuffix("/realtime")

    def env(self) -> dict[str, str]:
        return server_env(self.home)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def server_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMVOICE_") or k == "GLMVOICE_GOLDEN_DIR"}
    env.update(GLMVOICE_HOME=str(home), GLMVOICE_CONFIG=os.devnull, HF_HOME=str(home / "hf"),
               HF_HUB_OFFLINE="1", GLMVOICE_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    return env


def start_server(models: Path, folder: Path, *args: str) -> Server:
    """`glmvoice serve` on a free loopback port; returns once it listens (its stderr says where)."""
    home = folder / "home"
    home.mkdir(parents=True, exist_ok=True)
    log = folder / "serve.log"
    command = [sys.executable, "-m", "glmvoice_cli", "serve", "--models", str(models), "--device", "cpu",
               "--port", "0", "--seed", "1", "--max-new-tokens", "40", *args]
    with open(log, "wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=server_env(home))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = _URL.search(log.read_text(errors="replace"))
        if found:
            return Server(process, found.group(0), home, log)
        if process.poll() is not None:
            raise AssertionError(f"glmvoice serve exited {process.returncode}: {log.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"glmvoice serve did not start: {log.read_text()}")


def session_root(server: Server) -> Path:
    """The --session-dir the server was started with."""
    args = list(server.process.args)  # type: ignore[arg-type]
    return Path(args[args.index("--session-dir") + 1])


def transcript(folder: Path) -> list[dict[str, Any]]:
    """The saved lines so far (a line being written by the server at this moment is not one yet)."""
    path = folder / "transcript.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def saved_session(server: Server, lines: int) -> list[dict[str, Any]]:
    """The newest session's transcript once it holds `lines` lines (or what it holds when they never come)."""
    saved: list[dict[str, Any]] = []
    for _ in range(SAVE_ATTEMPTS):
        folders = [f for f in session_root(server).iterdir() if (f / "meta.json").is_file()]
        if folders:
            newest = max(folders, key=lambda f: json.loads((f / "meta.json").read_text())["created"])
            saved = transcript(newest)
            if len(saved) >= lines:
                break
        time.sleep(0.1)
    return saved


def client(server: Server, key: str = KEY) -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(api_key=key, websocket_base_url=server.base)


def pcm16(samples: np.ndarray) -> str:
    pcm = np.clip(np.round(np.asarray(samples, np.float64) * 32768), -32768, 32767).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode()


def wire_audio(deltas: list[str]) -> np.ndarray:
    raw = b"".join(base64.b64decode(d) for d in deltas)
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768


@dataclass
class Answer:
    """What a client saw of one response."""

    events: list[Any] = field(default_factory=list)
    audio: list[str] = field(default_factory=list)  # base64 deltas
    transcript: str = ""
    done: Any = None  # the response.done event

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]

    @property
    def status(self) -> str:
        return self.done.response.status

    @property
    def item_id(self) -> str:
        return next(e.item_id for e in self.events if e.type == "response.output_audio.delta")


async def next_event(conn: Any, timeout: float = EVENT_TIMEOUT_S) -> Any:
    return await asyncio.wait_for(conn.recv(), timeout)


async def until(conn: Any, kind: str, timeout: float = EVENT_TIMEOUT_S) -> list[Any]:
    """Every event up to and including the first of type `kind`."""
    seen = []
    while True:
        event = await next_event(conn, timeout)
        seen.append(event)
        if event.type == kind:
            return seen


async def answer(conn: Any, on_first_audio: Any = None) -> Answer:
    """Read events until response.done; `on_first_audio` (async) runs at the first audio delta."""
    got = Answer()
    while True:
        event = await next_event(conn)
        got.events.append(event)
        if event.type == "response.output_audio.delta":
            if not got.audio and on_first_audio is not None:
                await on_first_audio(event)
            got.audio.append(event.delta)
        elif event.type == "response.output_audio_transcript.delta":
            got.transcript += event.delta
        elif event.type == "response.done":
            got.done = event
            return got


async def stream(conn: Any, samples_24k: np.ndarray, chunk_s: float = 0.1, pace: float = 0.0) -> None:
    """Append audio in chunks; `pace` 1.0 is real time, 0 as fast as the socket takes it."""
    step = int(chunk_s * WIRE_RATE)
    for start in range(0, len(samples_24k), step):
        await conn.input_audio_buffer.append(audio=pcm16(samples_24k[start : start + step]))
        if pace:
            await asyncio.sleep(chunk_s / pace)


def typed(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


PUSH_TO_TALK = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
