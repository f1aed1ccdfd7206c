"""The ASGI app of `glmvoice serve`: `/v1/realtime` (WebSocket), one `RealtimeSession` per connection, and the
browser page (`/`, its files under `/static`, from `serve/web/`; `/health` says whether a key is needed).

All connections share one `ModelWorker` (one thread runs every conversation's model work, round-robin
with answers first) and the loaded models. Starlette does the HTTP and WebSocket protocol; this file does
authentication, the session limit, the message-size bound and the bridge between the asyncio side and the
session's threads (a queue per connection, filled with `call_soon_threadsafe`).

Imported only by `glmvoice serve` (Starlette is the optional extra `glmvoice[server]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from glmvoice_cli.audio.end_of_turn import JudgeThread
from glmvoice_cli.chat.worker import ModelWorker
from glmvoice_cli.serve.protocol import ProtocolError, error_event
from glmvoice_cli.serve.session import CLOSE, RealtimeSession

if TYPE_CHECKING:
    from glmvoice_cli.audio.end_of_turn import TurnJudge
    from glmvoice_cli.pipeline import GenerationOptions
    from glmvoice_cli.pipeline.assistant import Assistant
    from glmvoice_cli.sessions.store import SessionStore

log = logging.getLogger("glmvoice_cli")

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a bigger message gets an error event (about 60 s of 24 kHz audio)
HARD_MESSAGE_BYTES = 16 * 1024 * 1024  # the WebSocket layer closes the connection beyond this
JOIN_TIMEOUT_S = 10.0
CLOSE_TRY_AGAIN = 1013  # WebSocket close code: try again later (the session limit)
CLOSE_POLICY = 1008  # refused: no or wrong API key
CLOSE_SERVER_ERROR = 1011
KEY_SUBPROTOCOL = "openai-insecure-api-key."
NO_STORE = {"cache-control": "no-store"}
DEFAULT_CLIENT_BUFFER_BYTES = 32 * 1024 * 1024  # ~10 minutes of 24 kHz answer audio a client has not read
CLOSE_TIMEOUT_S = 2.0  # a close frame to a client that reads nothing cannot wait for it


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None = None  # None: no authentication (loopback only, see `commands.serve`)
    max_sessions: int = 4
    save: bool = True
    session_root: Path | None = None  # None: each session in a new folder under the data folder
    model: str = "glm-4-voice-9b"
    client_buffer_bytes: int = DEFAULT_CLIENT_BUFFER_BYTES  # unsent output a connection may hold (see Outbox)
    turn_judge: TurnJudge | None = None  # the end-of-turn detector for semantic_vad (None: server_vad only)


class RealtimeServer:
    """The models, the worker and the live sessions; `app()` is what uvicorn serves."""

    def __init__(self, assistant: Assistant, generation: GenerationOptions, options: ServeOptions) -> None:
        self.assistant, self.generation, self.options = assistant, generation, options
        self.worker = ModelWorker(prepare=assistant.prepare_thread)
        # one thread judges every session's pauses (a decision is tens of milliseconds of one core)
        self.judge = JudgeThread(options.turn_judge) if options.turn_judge is not None else None
        self._lock = threading.Lock()
        self._sessions: set[RealtimeSession] = set()
        self._slots = 0  # connections holding a session slot (reserved before the session exists)

    def app(self) -> Starlette:
        web = Path(__file__).with_name("web")
        return Starlette(routes=[
            WebSocketRoute("/v1/realtime", self._realtime), Route("/health", self._health),
            Route("/", lambda request: FileResponse(web / "index.html", headers=NO_STORE)),
            Mount("/static", StaticFiles(directory=web), name="static"),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.worker.start()
        try:
            yield
        finally:
            with self._lock:
                sessions = list(self._sessions)
            for session in sessions:
                session.close()
            await asyncio.to_thread(self._stop_worker, sessions)

    def _stop_worker(self, sessions: list[RealtimeSession]) -> None:
        for session in sessions:
            session.join(JOIN_TIMEOUT_S)
        self.worker.stop()
        self.worker.join(JOIN_TIMEOUT_S)

    async def _health(self, request: Request) -> JSONResponse:
        with self._lock:
            active = self._slots
        return JSONResponse({"status": "ok", "sessions": active, "max_sessions": self.options.max_sessions,
                             "auth": self.options.api_key is not None}, headers=NO_STORE)

    # ------------------------------------------------------------------ one connection

    async def _realtime(self, ws: WebSocket) -> None:
        offered = [str(p) for p in ws.scope.get("subprotocols", [])]
        if not self._authorized(ws.headers.get("authorization"), offered):
            await ws.close(code=CLOSE_POLICY)  # before accept: the handshake is refused (HTTP 403)
            return
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        if not self._take_slot():
            refusal = ProtocolError(f"the server already has {self.options.max_sessions} sessions: try again later",
                                    code="session_limit_reached", kind="server_error")
            await ws.send_text(json.dumps(error_event(refusal)))
            await ws.close(code=CLOSE_TRY_AGAIN)
            return
        try:
            await self._converse(ws)
        finally:
            with self._lock:
                self._slots -= 1

    async def _converse(self, ws: WebSocket) -> None:
        outbox = Outbox(asyncio.get_running_loop(), self.options.client_buffer_bytes)
        send = outbox.put  # from any thread, in order

        with contextlib.ExitStack() as held:
            try:
                store = await asyncio.to_thread(self._open_store, held) if self.options.save else None
            except Exception as e:  # noqa: BLE001 - a full disk, a read-only folder: say it and close
                failure = ProtocolError(f"cannot save the session: {e}", code="session_store_failed",
                                        kind="server_error")
                await ws.send_text(json.dumps(error_event(failure)))
                await ws.close(code=CLOSE_SERVER_ERROR)
                return
            session = RealtimeSession(self.assistant, self.worker, send, generation=self.generation, store=store,
                                      turn_judge=self.judge)
            session.settings.model = ws.query_params.get("model") or self.options.model
            with self._lock:
                self._sessions.add(session)
            sender = asyncio.create_task(self._send_loop(ws, outbox))
            receiver = asyncio.create_task(self._receive_loop(ws, session, sender))
            stalled = asyncio.create_task(outbox.overflowed.wait())
            try:
                session.start()
                await asyncio.wait({sender, receiver, stalled}, return_when=asyncio.FIRST_COMPLETED)
                if stalled.done():
                    log.warning("closing a connection whose client read none of its last %d MiB",
                                self.options.client_buffer_bytes >> 20)
            finally:
                session.close()  # a client that vanished (or stopped reading) frees its turn and its cache at once
                for task in (sender, receiver, stalled):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                await asyncio.to_thread(session.join, JOIN_TIMEOUT_S)
                with self._lock:
                    self._sessions.discard(session)
                with contextlib.suppress(Exception):  # bounded: the client may be reading nothing at all
                    await asyncio.wait_for(ws.close(code=CLOSE_POLICY if stalled.done() else 1000), CLOSE_TIMEOUT_S)

    async def _receive_loop(self, ws: WebSocket, session: RealtimeSession, sender: asyncio.Task[None]) -> None:
        while not sender.done():
            try:
                message = await ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            data: str | bytes | None = message.get("text")
            if data is None:
                data = message.get("bytes")
            if data is None:
                continue
            if len(data) > MAX_MESSAGE_BYTES:
                session.handle_error(ProtocolError(
                    f"a message may hold at most {MAX_MESSAGE_BYTES // (1024 * 1024)} MiB: send audio in smaller "
                    "chunks", code="message_too_large"))
                continue
            session.handle(data)

    @staticmethod
    async def _send_loop(ws: WebSocket, outbox: Outbox) -> None:
        while True:
            text = await outbox.get()
            if text is None:
                await ws.close(code=CLOSE_SERVER_ERROR)
                return
            try:
                await ws.send_text(text)
            except (WebSocketDisconnect, RuntimeError, OSError):
                return
            finally:
                outbox.sent(text)

    # ------------------------------------------------------------------ admission

    def _authorized(self, header: str | None, offered: list[str]) -> bool:
        wanted = self.options.api_key
        if wanted is None:
            return True
        keys = [p[len(KEY_SUBPROTOCOL):] for p in offered if p.startswith(KEY_SUBPROTOCOL)]
        if header is not None and header.lower().startswith("bearer "):
            keys.append(header[len("bearer "):].strip())
        return any(secrets.compare_digest(key.encode(), wanted.encode()) for key in keys)

    def _take_slot(self) -> bool:
        with self._lock:
            if self._slots >= self.options.max_sessions:
                return False
            self._slots += 1
            return True

    def _open_store(self, held: contextlib.ExitStack) -> SessionStore:
        """A new session, as `chat` opens one (under --session-dir when given), locked while the connection lives."""
        from glmvoice_cli.chat.local import lock_session, open_store

        root = self.options.session_root
        folder = None if root is None else root / f"realtime-{secrets.token_hex(6)}"
        store = open_store(folder, None, self.assistant.dirs, "voice")
        held.enter_context(lock_session(store.path))
        return store


class Outbox:
    """A connection's events on their way to the client, serialised by the thread that sends them, and counted:
    a client that reads nothing (its socket full, every send waiting) would otherwise make the server hold every
    answer it is sent. Past `limit` bytes not yet sent, `overflowed` is set and the connection is closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop, self._limit = loop, limit
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._lock = threading.Lock()
        self.pending = 0  # bytes put and not yet sent
        self.overflowed = asyncio.Event()

    def put(self, event: object) -> None:
        """From any thread, in order. CLOSE asks the send loop to close the connection."""
        text = None if event is CLOSE else json.dumps(event)
        with self._lock:
            self.pending += 0 if text is None else len(text)
            over = self.pending > self._limit
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
            self._loop.call_soon_threadsafe(self._queue.put_nowait, text)
            if over:
                self._loop.call_soon_threadsafe(self.overflowed.set)

    async def get(self) -> str | None:
        return await self._queue.get()

    def sent(self, text: str | None) -> None:
        with self._lock:
            self.pending -= 0 if text is None else len(text)
